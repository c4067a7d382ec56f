"""
Prepare a small English prose set, offline: the help topics of the Python documentation that
ship with every Python install (pydoc_data.topics.topics, a dict {topic key: text}).

    python data/prose/prepare.py
    python data/prose/prepare.py --out_dir=/tmp/prose

writes train.bin, val.bin (np.uint16 GPT-2 token ids, one <|endoftext|> before each topic) and
meta.json next to this script. About 10% of the topics go to val, chosen by a hash of the topic
key (see data/common.py). The counts depend on the Python version; see the end of file.
"""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # run as a script, Python puts data/prose/ on sys.path, not the repo root, so
    # `import data.common` would fail; add the repo root (two folders up). Imported as
    # data.prose.prepare this is skipped.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.common import split_keys, write_splits

def prepare(out_dir=None, topics=None, val_fraction=0.1):
    """
    Tokenize the topics dict (default: pydoc_data.topics.topics) into out_dir (default: this
    script's folder). Returns the meta dict also written to meta.json.
    """
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    if topics is None:
        from pydoc_data.topics import topics
    train, val = split_keys(topics, val_fraction)
    print(f"{len(topics)} topics: {len(train)} train, {len(val)} val")
    return write_splits(
        out_dir,
        {"train": [topics[k] for k in train], "val": [topics[k] for k in val]},
        source="pydoc_data.topics (Python documentation help topics)",
        extra={"val_fraction": val_fraction},
    )

@dataclass
class PrepareConfig:
    out_dir: str = ""             # where train.bin, val.bin and meta.json go; "": next to this script
    val_fraction: float = 0.1     # share of topics in val: ~11 of 79, the most a set this small spares

def main(argv=None):
    from lib import cli   # here, not at the top: preparing data needs no torch, only this command line does
    cfg = PrepareConfig()
    # preparing is reading and writing files: each of its expected failures (an unwritable
    # out_dir, GPT-2's ranks) is one line; the checks in write_splits stay asserts
    with cli.one_line_errors():
        cli.configure(cfg, sys.argv[1:] if argv is None else argv, presets=False, positional=False)
        cli.check(cfg, ("val_fraction", 0 < cfg.val_fraction < 1, "a fraction between 0 and 1"))
        t0 = time.time()
        prepare(cfg.out_dir or None, val_fraction=cfg.val_fraction)
    print(f"done in {time.time() - t0:.1f}s")

if __name__ == "__main__":
    main()

# Counts from one run on Python 3.11.7 (its pydoc_data.topics: 79 topics; other versions give
# other numbers), 0.3 s.
# "tokens" counts one EOT per document; "bytes" are the UTF-8 bytes of the text alone.
# train: 68 topics, 131,127 tokens, 439,218 bytes (3.35 bytes/token)
# val:   11 topics,   7,889 tokens,  26,899 bytes (3.41 bytes/token)
