"""sample.py end to end on a tiny untrained checkpoint: prompts of every kind, colour, errors."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from lib import cli
import fastgen
import sample
from zip2zip import GPT, GPTConfig, Tokenizer, lzw_decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "def f(x):\n    return x\n\ndef g(x):\n    return x\n"   # repeats: the prompt has hypertokens


def save(path, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, block_size=32), **kw})
    torch.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg)}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save(tmp_path_factory.mktemp("out") / "ckpt.pt")


def run(capsys, ckpt, *args):
    sample.main([f"--out_dir={ckpt}", "--num_samples=2", "--max_new_tokens=6", *args])
    return capsys.readouterr().out


STATS = re.compile(r"--- sample (\d)/2: (\d+) codes for (\d+) base tokens \(length ratio [\d.]+\), "
                   r"\d+% hypertokens, [\d,]+ bytes in [\d.]+ s = [\d,]+ bytes/s")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(4, 1024)


@pytest.mark.parametrize("color", [True, False, None])
def test_colour_and_stats(capsys, ckpt, tok, color):
    args = [f"--start={CODE}"] + ([] if color is None else [f"--color={color}"])
    out = run(capsys, ckpt, *args)
    # the prompt is shown once, in its own block, with its hypertokens marked: ANSI colours when
    # asked for, a pair of marks otherwise (captured output is not a terminal: also the default)
    shown = cli.show(tok, tok.encode(CODE), color=color is True)
    assert "⟦" in cli.show(tok, tok.encode(CODE), color=False)   # there are hypertokens to mark
    assert out.count(shown) == 1 and out.index("=== prompt ===\n" + shown) < out.index("=== sample 1/2 ===")
    assert ("\x1b[" in out) == (color is True)
    stats = STATS.findall(out)
    assert [s[0] for s in stats] == ["1", "2"] and all(s[1] == "6" for s in stats)
    assert all(int(s[2]) >= 6 for s in stats)             # each code stands for >= 1 base token


def test_samples_show_the_continuation_alone(capsys, ckpt, tok):
    # greedy, so the continuation is known: each sample block holds it, not the prompt again
    out = run(capsys, ckpt, f"--start={CODE}", "--temperature=0", "--color=False")
    model, _ = cli.load_checkpoint(ckpt)
    row = fastgen.generate(model, [tok.encode("<|endoftext|>" + CODE)], 6, temperature=0)[0]   # sample.py's path
    text = tok.decode(row)[len("<|endoftext|>" + CODE):]
    block = out.split("=== sample 1/2 ===\n")[1].split("\n--- sample 1/2")[0]
    if block.startswith("hypertokens are shown"):        # the legend, when there is a hypertoken
        block = block.split("\n", 1)[1]
    assert block.replace("⟦", "").replace("⟧", "") == text


def test_same_seed_same_samples(capsys, ckpt):
    strip = lambda s: re.sub(r"in [\d.]+ s = [\d,]+ bytes/s", "", s)
    a = strip(run(capsys, ckpt, "--start=x = 1", "--seed=7"))
    b = strip(run(capsys, ckpt, "--start=x = 1", "--seed=7"))
    assert a == b


def test_empty_prompt_starts_from_endoftext(capsys, ckpt):
    out = run(capsys, ckpt, "--start=", "--color=False")
    assert "prompt: 0 base tokens in 0 codes" in out and len(STATS.findall(out)) == 2


def test_file_prompt_longer_than_the_context(capsys, ckpt, tok, tmp_path):
    text = CODE * 20 + "".join(f"v{i} = {i * i}\n" for i in range(40))
    path = tmp_path / "prompt.py"
    path.write_text(text)
    out = run(capsys, ckpt, f"--start=FILE:{path}", "--color=False")
    n_codes = int(re.search(r"prompt: \d+ base tokens in (\d+) codes", out).group(1))
    assert n_codes > 32                                    # longer than block_size
    assert out.count(cli.show(tok, tok.encode(text), color=False)) == 1 and len(STATS.findall(out)) == 2


def test_stats_count_the_generated_text(capsys, ckpt, tok):
    # greedy: the sample is reproducible, so its base tokens can be recounted here
    out = run(capsys, ckpt, f"--start={CODE}", "--temperature=0", "--num_samples=1")
    n_codes, n_base = map(int, re.search(r"(\d+) codes for (\d+) base tokens", out).groups())
    model, _ = cli.load_checkpoint(ckpt)
    prompt = tok.encode("<|endoftext|>" + CODE)
    row = fastgen.generate(model, [prompt], 6, temperature=0)[0]
    assert n_codes == 6 and n_base == len(lzw_decode(row, tok.vocab_size, 1024, 4, tok.disabled_ids)) \
        - len(lzw_decode(prompt, tok.vocab_size, 1024, 4, tok.disabled_ids))


def test_bfloat16_greedy_sample_matches_the_model(capsys, ckpt, tok):
    # --dtype=bfloat16 runs under autocast (on the CPU here): the sample is the model's own
    # greedy continuation in bf16, and it decodes
    out = run(capsys, ckpt, f"--start={CODE}", "--temperature=0", "--num_samples=1", "--dtype=bfloat16",
              "--color=False")
    model, _ = cli.load_checkpoint(ckpt)
    prompt = tok.encode("<|endoftext|>" + CODE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row = fastgen.generate(model.eval(), [prompt], 6, temperature=0)[0]
    assert cli.show(tok, row[1:], False, len(prompt) - 1) in out


def test_digit_disabled_checkpoint(capsys, tmp_path):
    digits = sorted(Tokenizer(4, 1024, no_digit_merges=True).disabled_ids)
    path = save(tmp_path / "ckpt.pt", disabled_ids=tuple(digits))
    out = run(capsys, path, "--start=x = 12345 + 12345 + 12345", "--color=False")
    assert len(STATS.findall(out)) == 2


@pytest.mark.parametrize("args,message", [
    (["--out_dir=/nonexistent/out"], "no checkpoint at"),
    (["--start=FILE:/nonexistent/prompt.txt"], "--start=FILE:/nonexistent/prompt.txt: cannot read the prompt file"),
    (["--bogus=1"], "unknown key 'bogus'"),
    (["--color=maybe"], "--color=maybe: expected True or False"),
    (["positional"], "unexpected argument"),
    (["--top_k=-1"], "--top_k=-1: expected 0 (all codes) or more"),
    (["--temperature=-0.5"], "--temperature=-0.5: expected 0 (greedy) or more"),
    (["--temperature=1e999"], "--temperature=inf: expected 0 (greedy) or more, and finite"),
    (["--num_samples=-1"], "--num_samples=-1: expected 0 or more"),
    (["--max_new_tokens=-1"], "--max_new_tokens=-1: expected 0 or more"),
    (["--device=gpu"], "--device=gpu: unknown device"),
    (["--dtype=float8"], "--dtype=float8: expected auto, float32, bfloat16 or float16"),
    # the device is checked before the checkpoint is read: a bad device never blames the file
    (["--device=gpu", "--out_dir=/nonexistent/out"], "--device=gpu: unknown device"),
] + ([(["--device=cuda"], "--device=cuda: CUDA is not available")] if not torch.cuda.is_available() else []))
def test_clear_errors(ckpt, args, message):
    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={ckpt}", *args])
    assert str(e.value).startswith("error: ") and message in str(e.value)


def test_incompatible_checkpoints(tmp_path):
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    small_vocab = save(tmp_path / "small.pt", vocab_size=100, disabled_ids=(99,))
    odd_walls = save(tmp_path / "walls.pt", disabled_ids=(50256, 13))
    for path, message in [(tmp_path / "junk.pt", "not a zip2zip checkpoint"),
                          (tmp_path / "text.pt", "not a readable checkpoint"),
                          (small_vocab, "GPT-2 BPE has 50257"), (odd_walls, "disabled ids")]:
        with pytest.raises(SystemExit) as e:
            sample.main([f"--out_dir={path}"])
        assert str(e.value).startswith("error: ") and message in str(e.value)


def test_command_line_error_is_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={tmp_path}"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no checkpoint at")
