"""
Prepare a small English prose set, offline: the help topics of the Python documentation that
ship with every Python install (pydoc_data.topics.topics, a dict {topic key: text}).

    python data/prose/prepare.py

writes train.bin, val.bin (np.uint16 GPT-2 token ids, one <|endoftext|> before each topic) and
meta.json next to this script. About 10% of the topics go to val, chosen by a hash of the topic
key (see data/common.py). The counts depend on the Python version; see the end of file.
"""

import os
import sys
import time
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

if __name__ == "__main__":
    t0 = time.time()
    prepare()
    print(f"done in {time.time() - t0:.1f}s")

# Counts from one run on Python 3.11.7 (its pydoc_data.topics: 79 topics; other versions give
# other numbers), 0.3 s.
# "tokens" counts one EOT per document; "bytes" are the UTF-8 bytes of the text alone.
# train: 68 topics, 131,127 tokens, 439,218 bytes (3.35 bytes/token)
# val:   11 topics,   7,889 tokens,  26,899 bytes (3.41 bytes/token)
