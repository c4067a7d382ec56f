"""
Make the data of the offline lm-eval tasks in this folder (see README.md) from the VALIDATION
splits only, so that no task text was ever trained on:

    python tasks/prepare.py
    python tasks/prepare.py --out_dir=/tmp/tasks

reads data/pycode/val.bin and data/prose/val.bin (run data/pycode/prepare.py and
data/prose/prepare.py first) and writes, next to this script:

    code_mc.jsonl      zip2zip_code_mc: pick the true next line of a standard-library file (of 4)
    prose_cloze.jsonl  zip2zip_prose_cloze: predict the last word of a help-topic passage
    pycode_bpb.jsonl   zip2zip_pycode_bpb: the text of train.py's validation windows, scored whole
    sources.json       the sha256 of the val.bin files read, and the counts

The val splits depend on the Python version that prepared them (its standard library and help
topics), so the JSONL files are committed: every user gets the same tasks. Nothing here draws
random numbers: items are picked and choices ordered by sha256 of a key, the same on every
machine, run and Python version (as data/common.py splits documents).
"""

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    # run as a script, Python puts tasks/ on sys.path, not the repo root; add the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.common import gpt2_bpe, token_byte_lengths

REPO = Path(__file__).resolve().parents[1]
EOT = 50256

# zip2zip_code_mc
CODE_ITEMS = 200          # enough for a rough accuracy (+-3.5 points), small enough for a CPU run
CODE_CONTEXT_LINES = 8    # the lines before the answer: enough to see what the code is doing
CODE_CONTEXT_CHARS = 400  # ...but at most this much text, so a small block_size holds it
CODE_MAX_LINE = 100       # longer lines (tables, long strings) make poor choices
# zip2zip_prose_cloze
CLOZE_ITEMS = 200         # the most to keep; prose val is small and gives fewer
CLOZE_MAX_CHARS = 400     # the passage starts at the earliest sentence within this many characters
CLOZE_MIN_CHARS = 100     # ...and is skipped if shorter: the word needs context to be guessable
NOT_WORDS = {"etc"}       # abbreviations that end a sentence like a word
# zip2zip_pycode_bpb: train.py's defaults for a small model
BPB_BLOCK_SIZE = 256
BPB_WINDOWS = 96

# -----------------------------------------------------------------------------
# helpers

def _rank(key):
    """A stable pseudo-random order: sort by this. sha256, not hash() (salted per process) nor a
    random generator (whose streams may change between library versions)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()

def read_val(name):
    """data/<name>/val.bin as an array of uint16 ids; OSError naming the prepare command if absent."""
    path = REPO / "data" / name / "val.bin"
    if not path.exists():
        raise OSError(f"{path} is missing: run python data/{name}/prepare.py first")
    return np.fromfile(path, dtype=np.uint16)

def documents(enc, ids):
    """The texts of the documents in ids ([EOT, doc0..., EOT, doc1...]), without the EOTs."""
    walls = np.flatnonzero(ids == EOT).tolist() + [len(ids)]
    return [enc.decode(ids[a + 1:b].tolist()) for a, b in zip(walls, walls[1:])]

# -----------------------------------------------------------------------------
# zip2zip_code_mc: HellaSwag on code

def is_real_line(line):
    """A line worth predicting or offering as a choice: not blank, not just punctuation
    (")", "]:") and not too long. Example: "    return x" yes, "    )" no."""
    s = line.strip()
    return (len(s) >= 8 and sum(c.isalnum() for c in s) >= 4 and len(line) <= CODE_MAX_LINE
            and "<|endoftext|>" not in line)

def code_item(d, lines, j, pool):
    """The item whose answer is lines[j] of document d, or None if it makes a poor one.

    query: up to CODE_CONTEXT_LINES lines before it, joined by "\n", ending in a non-space;
    choices: "\n" + a line, so that query + choices[label] is the file's text exactly and the
    split falls where a line ends (the YAML sets target_delimiter: "" so lm-eval adds nothing).
    Distractors: 3 real lines of the same file, indentation kept, whose stripped text differs
    from the answer's and from each other's.
    """
    if not lines[j - 1].strip() or lines[j - 1] != lines[j - 1].rstrip():
        # the query would end in whitespace that GPT-2's BPE joins to the answer's "\n" (a blank
        # line: "\n\n" is one token), so the split would cut a token in two
        return None
    context = lines[max(0, j - CODE_CONTEXT_LINES):j]
    while len("\n".join(context)) > CODE_CONTEXT_CHARS and len(context) > 1:
        context = context[1:]   # drop the oldest line
    while context and not context[0].strip():
        context = context[1:]   # do not start on a blank line
    if not context or len("\n".join(context)) > CODE_CONTEXT_CHARS:
        return None
    answer = lines[j]
    distractors, seen = [], {answer.strip()}
    for line in sorted(pool, key=lambda line: _rank(f"code_mc:{d}:{j}:{line}")):
        if line.strip() not in seen:
            seen.add(line.strip())
            distractors.append(line)
        if len(distractors) == 3:
            break
    if len(distractors) < 3:
        return None
    label = int(_rank(f"code_mc_label:{d}:{j}"), 16) % 4
    choices = distractors[:label] + [answer] + distractors[label:]
    return {"query": "\n".join(context), "choices": ["\n" + c for c in choices], "label": label,
            "doc": d, "line": j}

def make_code_mc(docs):
    candidates = []
    for d, text in enumerate(docs):
        lines = text.split("\n")
        candidates += [(d, j) for j in range(1, len(lines)) if is_real_line(lines[j])]
    candidates.sort(key=lambda dj: _rank(f"code_mc:{dj[0]}:{dj[1]}"))
    pools = {}
    items = []
    for d, j in candidates:    # in rank order: a random sample, so --limit=N takes a fair part
        lines = docs[d].split("\n")
        if d not in pools:     # the file's distinct real lines, the distractors' source
            pools[d] = sorted({line for line in lines if is_real_line(line)})
        item = code_item(d, lines, j, pools[d])
        if item:
            items.append(item)
        if len(items) == CODE_ITEMS:
            break
    return items

# -----------------------------------------------------------------------------
# zip2zip_prose_cloze: LAMBADA on the help topics

# a sentence's last word: letters only, 3 or more, after a space (so " " + word is the text's own
# spelling; a word after a line break would not be), before . ? or ! and whitespace or the end
LAST_WORD = re.compile(r"(?<= )([A-Za-z]{3,})[.?!](?=\s|$)")
SENTENCE_START = re.compile(r"[.?!]\s+|\n\s*\n\s*")

def make_prose_cloze(docs):
    items = []
    for d, text in enumerate(docs):
        starts = [0] + [m.end() for m in SENTENCE_START.finditer(text)]
        for m in LAST_WORD.finditer(text):
            word, end = m.group(1), m.start(1) - 1   # the context stops before the space
            line = text[text.rfind("\n", 0, end) + 1:end]
            if word.lower() in NOT_WORDS or "::=" in line or line.lstrip().startswith(">>>"):
                continue   # grammar rules and examples are code, not prose
            start = min((s for s in starts if end - CLOZE_MAX_CHARS <= s < end), default=end)
            if end - start < CLOZE_MIN_CHARS:
                continue
            items.append({"context": text[start:end], "target": " " + word, "doc": d, "offset": start})
    items.sort(key=lambda it: _rank(f"prose_cloze:{it['doc']}:{it['offset']}:{len(it['context'])}"))
    return items[:CLOZE_ITEMS]

# -----------------------------------------------------------------------------
# zip2zip_pycode_bpb: train.py's validation windows as wikitext-style documents

def make_pycode_bpb(enc, val):
    """One record per window of loader.eval_windows (block_size=256, eval_windows=96): the text of
    its 256 base ids (not the EOT in front), with what it takes to compare lm-eval's bits per
    byte with train.py's: n_bytes, the bytes train.py divides by (an EOT counts 0), and whether
    the text re-encodes to the same ids and has that many bytes."""
    import zip2zip
    from lib.loader import eval_windows
    plain = zip2zip.GPTConfig(block_size=BPB_BLOCK_SIZE, max_subtokens=1)   # M=1: the codes are the ids
    windows = eval_windows(val, BPB_WINDOWS, BPB_BLOCK_SIZE, plain, token_byte_lengths(enc))
    n_total = len(val) // BPB_BLOCK_SIZE
    numbers = np.linspace(0, n_total - 1, BPB_WINDOWS).round().astype(int)   # as eval_windows picks
    items = []
    for i, (codes, n_base, n_bytes) in zip(numbers.tolist(), windows):
        ids = val[i * BPB_BLOCK_SIZE:(i + 1) * BPB_BLOCK_SIZE].tolist()
        assert codes == [EOT] + ids and n_base == BPB_BLOCK_SIZE
        text = enc.decode(ids)   # a character cut at an edge decodes to U+FFFD
        text_bytes = len(text.encode("utf-8"))
        items.append({"text": text, "window": i, "n_base": n_base, "n_bytes": n_bytes,
                      "text_bytes": text_bytes, "n_eot": ids.count(EOT),
                      "round_trip": enc.encode(text, allowed_special={"<|endoftext|>"}) == ids,
                      "bytes_match": text_bytes == n_bytes})
    return items

# -----------------------------------------------------------------------------

def write_jsonl(path, items):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")

def prepare(out_dir=None):
    """Write the three JSONL files and sources.json into out_dir (default: this folder)."""
    out_dir = Path(out_dir or Path(__file__).resolve().parent)
    code, prose = read_val("pycode"), read_val("prose")   # both first: fail before any work
    enc = gpt2_bpe()
    tasks = {"code_mc": make_code_mc(documents(enc, code)),
             "prose_cloze": make_prose_cloze(documents(enc, prose)),
             "pycode_bpb": make_pycode_bpb(enc, code)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        write_jsonl(out_dir / f"{name}.jsonl", items)
        print(f"{name}: {len(items)} items")
    bpb = tasks["pycode_bpb"]
    sources = {
        "pycode_val_sha256": hashlib.sha256(code.tobytes()).hexdigest(),
        "prose_val_sha256": hashlib.sha256(prose.tobytes()).hexdigest(),
        "items": {name: len(items) for name, items in tasks.items()},
        "pycode_bpb_round_trip_failures": sum(not w["round_trip"] for w in bpb),
        "pycode_bpb_bytes_mismatches": sum(not w["bytes_match"] for w in bpb),
    }
    print(f"pycode_bpb: {sources['pycode_bpb_round_trip_failures']} windows do not re-encode to their ids, "
          f"{sources['pycode_bpb_bytes_mismatches']} have text bytes != train.py's bytes")
    with open(out_dir / "sources.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(sources, f, indent=2)
        f.write("\n")
    return sources

@dataclass
class PrepareConfig:
    out_dir: str = ""   # where the JSONL files go; "": next to this script, where the YAMLs read them

def main(argv=None):
    from lib import cli
    cfg = PrepareConfig()
    with cli.one_line_errors():   # a missing val.bin is one line naming the command to run
        cli.configure(cfg, sys.argv[1:] if argv is None else argv, presets=False, positional=False)
        prepare(cfg.out_dir or None)

if __name__ == "__main__":
    main()

# Counts from one run on Python 3.11.7 (the val.bin files of data/pycode and data/prose as its
# standard library and help topics make them; sha256 in sources.json), 3 s:
# code_mc:     200 items, in sha256 order from the 56,424 real lines of the 169 val files
# prose_cloze: 126 items: every sentence end of prose val that passes the rules (fewer than 200)
# pycode_bpb:   96 windows of 256 base tokens; all 96 re-encode to their own ids. 1 (window 0)
#               has text bytes != train.py's bytes: it holds 2 EOTs (short files between walls),
#               each "<|endoftext|>" in the text, 13 bytes to lm-eval and 0 to train.py: 910 vs 884.
