"""
Token efficiency of zip2zip's codec on files: how much shorter LZW makes GPT-2 BPE.

    python -m evals.efficiency FILE... [--key=value ...]
    python -m evals.efficiency data/pycode/val.bin data/prose/val.bin --show=True
    python -m evals.efficiency some_file.py --max_subtokens=3 --window=0

A `.bin` file is read as uint16 GPT-2 ids (as data/*/prepare.py writes them), anything else as
UTF-8 text. Each window of `window` base tokens is compressed with a fresh codebook, like a
training window.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np

from lib import cli
from lib.checks import as_ids
from zip2zip import Tokenizer, lzw_encode


def compression_stats(tokenizer, ids, window=1024):
    """Bytes, base tokens and codes for base ids cut into windows of `window` base tokens,
    each compressed with a fresh codebook (window=0: one codebook for everything)."""
    ids = as_ids(ids)
    step = window or max(len(ids), 1)
    n_codes = sum(len(lzw_encode(ids[i:i + step], tokenizer.vocab_size, tokenizer.max_codebook_size,
                                 tokenizer.max_subtokens, tokenizer.disabled_ids))
                  for i in range(0, len(ids), step))
    return {"bytes": tokenizer.n_bytes(ids), "base_tokens": len(ids), "codes": n_codes}


def read_ids(path, tok):
    """The base ids of a file: a `.bin` file holds uint16 GPT-2 ids, anything else is UTF-8 text.
    ValueError naming the file when it is neither (what was found, in one line)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file")
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".bin"):
        if len(data) == 0:
            raise ValueError(f"{path}: an empty .bin file (no ids)")
        if len(data) % 2:
            raise ValueError(f"{path}: {len(data):,} bytes, an odd number: not uint16 ids (2 bytes each)")
        ids = np.frombuffer(data, dtype=np.uint16)
        if ids.max() >= tok.vocab_size:
            at = int(np.argmax(ids >= tok.vocab_size))
            raise ValueError(f"{path}: id {ids[at]} at position {at:,}; GPT-2 ids are < {tok.vocab_size} "
                             f"(is it a .bin that data/*/prepare.py wrote?)")
        return ids.tolist()
    if b"\0" in data:   # text never holds a NUL byte; a binary file very likely does
        raise ValueError(f"{path}: a binary file, not text (a file of uint16 GPT-2 ids needs the .bin suffix)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start:,}; "
                         f"Latin-1 or another encoding? convert it to UTF-8 first)") from None
    return tok.bpe.encode_ordinary(text)


def efficiency_report(files, tok, window=1024, show=False, color=None):
    """Token efficiency of {name: base ids} per file and in total, printed as a table, then
    (show=True) each file's first window with its hypertokens marked. Returns the total."""
    color = sys.stdout.isatty() if color is None else color
    total = {"bytes": 0, "base_tokens": 0, "codes": 0}
    rows = [["file", "bytes", "base", "codes", "B/base", "B/code", "ratio"]]
    for name, ids in [*files.items(), ("total", None)]:
        if ids is None:
            s = total
        else:
            s = compression_stats(tok, ids, window)
            total = {k: total[k] + s[k] for k in total}
        b, n, c = s["bytes"], max(s["base_tokens"], 1), max(s["codes"], 1)
        rows.append([name, f"{b:,}", f"{s['base_tokens']:,}", f"{s['codes']:,}",
                     f"{b / n:.2f}", f"{b / c:.2f}", f"{c / n:.3f}"])
    print(f"M={tok.max_subtokens} C={tok.max_codebook_size} window={window or 'whole file'} base tokens")
    print("\n".join(cli.table(rows)))
    for name, ids in files.items() if show else ():
        print(f"\n=== {name}, first {'window' if window else 'whole file'} ===")
        print(cli.show(tok, lzw_encode(ids[:window or None], tok.vocab_size, tok.max_codebook_size,
                                       tok.max_subtokens, tok.disabled_ids), color))
    return total


@dataclass
class ReportConfig:
    max_subtokens: int = 4          # M: the paper's default merge size (M=3..5 are close)
    max_codebook_size: int = 1024   # C: enough entries for a 1024-token window of code
    window: int = 1024              # base tokens per fresh codebook, like a training window; 0: whole file
    no_digit_merges: bool = False   # keep digits out of hypertokens
    show: bool = False              # print each file's first window with hypertokens marked


def setup(argv):
    """(settings, tokenizer, {file: base ids}) from the command line, every file read and checked."""
    cfg = ReportConfig()
    paths = cli.configure(cfg, argv, presets=False)
    if not paths:
        raise ValueError("no FILE given; usage: python -m evals.efficiency FILE... [--key=value ...] (see --help)")
    cli.check(cfg, ("max_subtokens", cfg.max_subtokens >= 1, "1 (plain BPE) or more"),
              ("max_codebook_size", cfg.max_codebook_size >= 0, "0 or more"),
              ("window", cfg.window >= 0, "0 (whole file) or more base tokens"))
    tok = Tokenizer(cfg.max_subtokens, cfg.max_codebook_size, cfg.no_digit_merges)
    return cfg, tok, {path: read_ids(path, tok) for path in paths}


def main(argv=None):
    with cli.one_line_errors():
        cfg, tok, files = setup(sys.argv[1:] if argv is None else argv)
    return efficiency_report(files, tok, cfg.window, cfg.show)


if __name__ == "__main__":
    main()
