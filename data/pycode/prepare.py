"""
Prepare the Python standard library's own .py files as a code data set, offline.
Every Python install carries them, so this needs no download:

    python data/pycode/prepare.py
    python data/pycode/prepare.py --stdlib_dir=/path/to/Lib --out_dir=/tmp/pycode

writes train.bin, val.bin (np.uint16 GPT-2 token ids, one <|endoftext|> before each file) and
meta.json next to this script. About 10% of the files go to val, chosen by a hash of the file's
relative path (see data/common.py). The counts depend on the Python version; see the end of file.
"""

import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # run as a script, Python puts data/pycode/ on sys.path, not the repo root, so
    # `import data.common` would fail; add the repo root (two folders up). Imported as
    # data.pycode.prepare this is skipped.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.common import split_keys, write_splits

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # third-party code and bytecode

def _raise(error):
    raise error

def find_py_files(root):
    """Relative POSIX paths of all .py files under root, sorted, outside SKIP_DIRS. A folder that
    cannot be read is an OSError (os.walk would skip it silently: a data set quietly smaller)."""
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: not a folder")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune in place: never descend
        for fn in filenames:
            if fn.endswith(".py"):
                paths.append(Path(dirpath, fn).relative_to(root).as_posix())
    return sorted(paths)

def prepare(out_dir=None, stdlib_dir=None, val_fraction=0.1, num_threads=8):
    """
    Tokenize the .py files under stdlib_dir (default: this Python's standard library) into
    out_dir (default: this script's folder). Returns the meta dict also written to meta.json.
    """
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    t0 = time.time()
    texts, skipped = {}, []
    for i, rel in enumerate(find_py_files(root)):
        try:
            # bytes, then strict UTF-8: no newline translation, so the text is the file exactly
            texts[rel] = Path(root, rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)  # a few test files are Latin-1 etc. on purpose
        if (i + 1) % 500 == 0:
            print(f"read {i + 1} files")
    print(f"read {len(texts)} files from {root} in {time.time() - t0:.1f}s; "
          f"skipped {len(skipped)} that are not UTF-8")
    train, val = split_keys(texts, val_fraction)
    return write_splits(
        out_dir,
        {"train": [texts[k] for k in train], "val": [texts[k] for k in val]},
        source="Python standard library .py files (site-packages, dist-packages excluded)",
        extra={"val_fraction": val_fraction, "skipped_not_utf8": len(skipped)},
        num_threads=num_threads,
    )

@dataclass
class PrepareConfig:
    stdlib_dir: str = ""          # the folder of .py files to read; "": this Python's standard library
    out_dir: str = ""             # where train.bin, val.bin and meta.json go; "": next to this script
    val_fraction: float = 0.1     # share of files in val: ~170 files, enough for a steady val loss

def main(argv=None):
    from lib import cli   # here, not at the top: preparing data needs no torch, only this command line does
    cfg = PrepareConfig()
    # preparing is reading and writing files: each of its expected failures (a missing or
    # unreadable folder, GPT-2's ranks) is one line; the checks in write_splits stay asserts
    with cli.one_line_errors():
        cli.configure(cfg, sys.argv[1:] if argv is None else argv, presets=False, positional=False)
        cli.check(cfg, ("val_fraction", 0 < cfg.val_fraction < 1, "a fraction between 0 and 1"),
                  ("stdlib_dir", not cfg.stdlib_dir or os.path.isdir(cfg.stdlib_dir), "a folder"))
        t0 = time.time()
        prepare(cfg.out_dir or None, cfg.stdlib_dir or None, cfg.val_fraction)
    print(f"done in {time.time() - t0:.1f}s")

if __name__ == "__main__":
    main()

# Counts from one run on Python 3.11.7 (its standard library; other versions give other numbers),
# 1790 .py files found, 4 skipped as not UTF-8, 7 s on 2 CPU cores.
# "tokens" counts one EOT per document; "bytes" are the UTF-8 bytes of the text alone.
# train: 1,617 files, 13,886,805 tokens, 28,638,076 bytes (2.06 bytes/token)
# val:     169 files,  1,429,652 tokens,  2,874,009 bytes (2.01 bytes/token)
