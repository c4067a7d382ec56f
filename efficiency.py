"""
Token efficiency of zip2zip's codec on files: how much shorter LZW makes GPT-2 BPE.

    python efficiency.py data/pycode/val.bin data/prose/val.bin --show=True
    python efficiency.py some_file.py --max_subtokens=3 --window=0

A `.bin` file is read as uint16 GPT-2 ids (as data/*/prepare.py writes them), anything else as
UTF-8 text. Each window of `window` base tokens is compressed with a fresh codebook, like a
training window.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np

from cli import configure, show as show_codes
from zip2zip import Tokenizer, _as_list, lzw_encode


def compression_stats(tokenizer, ids, window=1024):
    """Bytes, base tokens and codes for base ids cut into windows of `window` base tokens,
    each compressed with a fresh codebook (window=0: one codebook for everything)."""
    ids = _as_list(ids)
    step = window or max(len(ids), 1)
    n_codes = sum(len(lzw_encode(ids[i:i + step], tokenizer.vocab_size, tokenizer.max_codebook_size,
                                 tokenizer.max_subtokens, tokenizer.disabled_ids))
                  for i in range(0, len(ids), step))
    return {"bytes": tokenizer.n_bytes(ids), "base_tokens": len(ids), "codes": n_codes}


def efficiency_report(paths, max_subtokens=4, max_codebook_size=1024, window=1024,
                      no_digit_merges=False, show=False, color=None):
    """Token efficiency per file and in total. A `.bin` file is read as uint16 base ids."""
    tok = Tokenizer(max_subtokens, max_codebook_size, no_digit_merges)
    color = sys.stdout.isatty() if color is None else color
    print(f"M={max_subtokens} C={max_codebook_size} window={window or 'whole file'} base tokens")
    print(f"{'file':<40} {'bytes':>12} {'base':>11} {'codes':>11} {'B/base':>7} {'B/code':>7} {'ratio':>6}")
    total = {"bytes": 0, "base_tokens": 0, "codes": 0}
    rows = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path!r} is not a file")
        if path.endswith(".bin"):
            ids = np.fromfile(path, dtype=np.uint16).tolist()
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                ids = tok.bpe.encode_ordinary(f.read())
        rows.append((path, compression_stats(tok, ids, window)))
        if show:
            print(show_codes(tok, lzw_encode(ids[:window or None], tok.vocab_size, max_codebook_size,
                                      max_subtokens, tok.disabled_ids), color))
    for name, s in rows + [("total", None)]:
        if s is None:
            s = total
        else:
            total = {k: total[k] + s[k] for k in total}
        b, n, c = s["bytes"], max(s["base_tokens"], 1), max(s["codes"], 1)
        print(f"{name[-40:]:<40} {b:>12,} {s['base_tokens']:>11,} {s['codes']:>11,} "
              f"{b / n:>7.2f} {b / c:>7.2f} {c / n:>6.3f}")
    return total


@dataclass
class ReportConfig:
    max_subtokens: int = 4          # M: the paper's default merge size (M=3..5 are close)
    max_codebook_size: int = 1024   # C: enough entries for a 1024-token window of code
    window: int = 1024              # base tokens per fresh codebook, like a training window; 0: whole file
    no_digit_merges: bool = False   # keep digits out of hypertokens
    show: bool = False              # print each file's first window with hypertokens marked


if __name__ == "__main__":
    cfg = ReportConfig()
    try:
        files = configure(cfg, sys.argv[1:], presets=False)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if not files:
        raise SystemExit("usage: python zip2zip.py FILE... [--max_subtokens=4] [--max_codebook_size=1024] "
                         "[--window=1024] [--no_digit_merges=False] [--show=False]\n"
                         "FILE is a text file or a .bin file of uint16 GPT-2 ids (data/pycode/val.bin)")
    efficiency_report(files, cfg.max_subtokens, cfg.max_codebook_size, cfg.window,
                      cfg.no_digit_merges, cfg.show)
