"""The tokenizer: GPT-2 BPE then LZW, round-trips from the empty string to whole files."""
import os
import sysconfig

import numpy as np
import pytest

from evals import efficiency
from evals.efficiency import compression_stats
from lib import cli
from lib.cli import show
from zip2zip import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(max_subtokens=4, max_codebook_size=1024)


STDLIB = sysconfig.get_paths()["stdlib"]
TEXTS = [
    "",
    "a",
    "hello hello hello hello hello",
    "def f(x):\n    return x\n\ndef g(x):\n    return x\n" * 5,
    "naïve café — 日本語のテキスト 🙂🙂🙂 ∑∫ ü ß",
    "one<|endoftext|>two<|endoftext|><|endoftext|>one two",
    "    " * 100 + "\n" * 50,
    "1234567890 " * 20,
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    codes = tok.encode(text)
    assert tok.decode(codes) == text
    assert len(codes) <= len(tok.encode_base(text))


@pytest.mark.parametrize("name", ["json/decoder.py", "textwrap.py", "this.py"])
@pytest.mark.parametrize("M,C", [(1, 1024), (2, 64), (4, 1024), (5, 16)])
def test_round_trip_whole_files(name, M, C):
    text = open(os.path.join(STDLIB, name), encoding="utf-8").read()
    tok = Tokenizer(max_subtokens=M, max_codebook_size=C)
    codes = tok.encode(text)
    assert tok.decode(codes) == text
    if M == 1:
        assert codes == tok.encode_base(text)
    else:
        assert len(codes) < len(tok.encode_base(text))   # code always has repeats


def test_endoftext_is_a_wall(tok):
    text = "abc abc abc<|endoftext|>abc abc abc"
    codes = tok.encode(text)
    i = codes.index(tok.eot)
    lzw = tok.codec()
    for c in codes[:i + 1]:
        lzw.push(c)
    before = list(lzw.entries)
    for c in codes[i + 1:]:
        lzw.push(c)
    # no entry contains the wall, and the text after it makes new entries of its own
    assert all(tok.eot not in e for e in lzw.entries)
    assert len(lzw.entries) > len(before)


def test_no_digit_merges():
    plain, nodig = Tokenizer(4, 1024), Tokenizer(4, 1024, no_digit_merges=True)
    text = "x = 12345 + 12345 + 12345 + 12345\n" * 10
    assert nodig.decode(nodig.encode(text)) == text
    lzw = nodig.codec()
    for c in nodig.encode(text):
        lzw.push(c)
    digit = lambda t: any(ch.isdigit() for ch in nodig.decode_base([t]))
    assert lzw.entries and not any(digit(t) for e in lzw.entries for t in e)
    # without the option, digits do merge
    lzw = plain.codec()
    for c in plain.encode(text):
        lzw.push(c)
    assert any(digit(t) for e in lzw.entries for t in e)


def test_segments_and_show(tok):
    text = "the cat the cat the cat é"
    codes = tok.encode(text)
    segs = cli.segments(tok, codes)
    assert "".join(s for _, s in segs) == text
    assert any(c >= tok.vocab_size for c, _ in segs)
    plain = show(tok, codes, color=False)
    legend, body = plain.split("\n", 1)
    assert legend == "hypertokens are shown ⟦like this⟧" and "⟦" in body
    assert body.replace("⟦", "").replace("⟧", "") == text
    coloured = show(tok, codes, color=True)
    assert "\x1b[" in coloured
    # a multi-byte character split across two base tokens is shown whole, once
    emoji = "🙂🙂🙂🙂"
    assert "".join(s for _, s in cli.segments(tok, tok.encode(emoji))) == emoji


def test_compression_stats_and_report(tok, tmp_path, capsys):
    ids = tok.encode_base("for i in range(10):\n    print(i)\n" * 40)
    s = compression_stats(tok, ids, window=64)
    assert s["base_tokens"] == len(ids) and s["bytes"] == len(tok.decode_base(ids).encode())
    # windows never compress better than one codebook over the whole text
    assert s["codes"] >= compression_stats(tok, ids, window=0)["codes"]
    path = tmp_path / "a.bin"
    np.array(ids, dtype=np.uint16).tofile(path)
    (tmp_path / "a.py").write_text(tok.decode_base(ids))
    total = efficiency.main([str(path), str(tmp_path / "a.py"), "--window=64", "--show=True"])
    assert total == {k: 2 * v for k, v in s.items()}      # the .bin and the text are the same text
    out = capsys.readouterr().out
    # the table (header, two files, total), then each file's first window with its hypertokens marked
    lines = out.splitlines()
    assert lines[1].split() == ["file", "bytes", "base", "codes", "B/base", "B/code", "ratio"]
    assert [line.split()[0] for line in lines[2:5]] == [str(path), str(tmp_path / "a.py"), "total"]
    assert lines[6] == f"=== {path}, first window ===" and lines[7] == "hypertokens are shown ⟦like this⟧"


def test_report_refuses_what_is_not_ids_or_utf8_text(tmp_path):
    files = {"latin1.txt": "café au lait\n".encode("latin-1"), "image.png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
             "odd.bin": b"\x01\x00\x02", "empty.bin": b"", "big.bin": np.array([1, 50256, 60000], np.uint16).tobytes()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for argv, message in [
            (["latin1.txt"], "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3; Latin-1 or another encoding?"),
            (["image.png"], "image.png: a binary file, not text"),
            (["odd.bin"], "odd.bin: 3 bytes, an odd number: not uint16 ids"),
            (["empty.bin"], "empty.bin: an empty .bin file"),
            (["big.bin"], "big.bin: id 60000 at position 2; GPT-2 ids are < 50257"),
            (["missing.txt"], "missing.txt: not a file"),
            (["latin1.txt", "--window=-1"], "--window=-1: expected 0 (whole file) or more"),
            (["latin1.txt", "--max_subtokens=0"], "--max_subtokens=0: expected 1 (plain BPE) or more"),
            ([], "no FILE given")]:
        with pytest.raises(SystemExit) as e:
            efficiency.main([str(tmp_path / a) if not a.startswith("--") else a for a in argv])
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_shipped_ranks_are_tiktokens_r50k_base(tmp_path, monkeypatch):
    # the repository's copy of GPT-2's ranks gives tiktoken's own r50k_base ids, where tiktoken has
    # its file in its cache (CI points TIKTOKEN_CACHE_DIR at a cached copy); no test downloads it
    import tiktoken
    import tiktoken.load

    from data.common import gpt2_bpe
    ours = gpt2_bpe()

    def no_download(url):
        raise ConnectionAbortedError(f"a test may not download {url}")
    monkeypatch.setattr(tiktoken.load, "read_file", no_download)   # what tiktoken calls on a cache miss
    try:
        ref = tiktoken.get_encoding("r50k_base")
    except ConnectionAbortedError:
        pytest.skip("tiktoken's own r50k_base is not in its cache here (set TIKTOKEN_CACHE_DIR to a folder "
                    "holding it); this test compares the shipped ranks with it, and never downloads it")
    text = "def f(x):\n    return x  # naïve 日本 🙂\n\n\t  <|endoftext|> 1234 don't"
    assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert ours.n_vocab == ref.n_vocab == 50257 and ours.eot_token == 50256
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(OSError, match="damaged"):
        gpt2_bpe(str(bad))
    with pytest.raises(OSError, match="missing"):
        gpt2_bpe(str(tmp_path / "none"))
