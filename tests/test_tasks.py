"""
The offline lm-eval tasks of tasks/: they load from any folder, run end to end through lm-eval
with a dummy model, and their data comes from the validation splits, rebuilt byte for byte by
tasks/prepare.py. The lm-eval tests skip where lm-eval is not installed (it is optional); the data
tests skip where data/*/val.bin is absent (CI prepares no data) or is not the one the shipped
files were made from (another Python version's standard library).
"""

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from tasks import prepare

TASKS = Path(prepare.__file__).resolve().parent
NAMES = {"zip2zip_code_mc": ("code_mc", "multiple_choice"),
         "zip2zip_prose_cloze": ("prose_cloze", "loglikelihood"),
         "zip2zip_pycode_bpb": ("pycode_bpb", "loglikelihood_rolling")}


def shipped(name):
    with open(TASKS / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


SOURCES = json.loads((TASKS / "sources.json").read_text())


def val_ids(name):
    """data/<name>/val.bin, or a skip saying why the shipped tasks cannot be checked against it."""
    path = prepare.REPO / "data" / name / "val.bin"
    if not path.exists():
        pytest.skip(f"{path} is absent (python data/{name}/prepare.py makes it)")
    ids = np.fromfile(path, dtype=np.uint16)
    if hashlib.sha256(ids.tobytes()).hexdigest() != SOURCES[f"{name}_val_sha256"]:
        pytest.skip(f"{path} is not the val.bin the shipped tasks were made from (another Python version?)")
    return ids


@pytest.fixture(scope="module")
def enc():
    return prepare.gpt2_bpe()

# -----------------------------------------------------------------------------
# the data: from val, by the rules, rebuilt exactly


def check_code_item(item, text):
    """The rules of a code item, against the text of the file it came from."""
    lines = text.split("\n")
    answer = item["choices"][item["label"]]
    assert len(item["choices"]) == 4 and all(c.startswith("\n") for c in item["choices"])
    assert answer == "\n" + lines[item["line"]]
    assert item["query"] + answer in text                    # the context and its true next line
    assert text.split("\n")[:item["line"]][-1] == item["query"].split("\n")[-1]
    assert len(item["query"]) <= prepare.CODE_CONTEXT_CHARS and not item["query"][-1].isspace()
    stripped = [c.strip() for c in item["choices"]]
    assert len(set(stripped)) == 4                           # distinct, not even by indentation
    assert all(prepare.is_real_line(c[1:]) and c[1:] in lines for c in item["choices"])


def test_code_items_follow_the_rules():
    # hermetic: items made from two standard-library files, whatever data is prepared
    import json as a, textwrap as b
    docs = [Path(m.__file__).read_text(encoding="utf-8") for m in (a, b)]
    items = prepare.make_code_mc(docs)
    assert len(items) == prepare.CODE_ITEMS
    for item in items:
        check_code_item(item, docs[item["doc"]])
    assert {item["label"] for item in items} == {0, 1, 2, 3}


def test_cloze_items_end_before_a_real_word():
    text = ("Intro\n*****\n\nThe first sentence of this help topic is long enough to give any careful reader an idea. "
            "It says nothing. This one ends with a wrapped\nword.  And e.g. etc. this one ends in code "
            '"x".  The last sentence of the passage ends in a real word.')
    items = prepare.make_prose_cloze([text])
    # "idea": too little context; "wrapped word": the word follows a line break; "etc": not a
    # word; "x": not after a space
    assert [item["target"] for item in sorted(items, key=lambda i: i["offset"])] == [" nothing", " word"]
    for item in items:
        assert not item["context"].endswith(" ") and text[item["offset"]:].startswith(item["context"] + item["target"] + ".")
        assert len(item["context"]) <= prepare.CLOZE_MAX_CHARS


def test_splits_fall_between_tokens(enc):
    # a model that encodes context and continuation apart gets the tokens of the whole text
    bpe = enc.encode_ordinary
    for d in shipped("code_mc"):
        assert all(bpe(d["query"]) + bpe(c) == bpe(d["query"] + c) for c in d["choices"])
    for d in shipped("prose_cloze"):
        assert bpe(d["context"]) + bpe(d["target"]) == bpe(d["context"] + d["target"])


def test_shipped_items_come_from_val(enc):
    code_docs = prepare.documents(enc, val_ids("pycode"))
    prose_docs = prepare.documents(enc, val_ids("prose"))
    for item in shipped("code_mc"):
        check_code_item(item, code_docs[item["doc"]])
    for item in shipped("prose_cloze"):
        assert prose_docs[item["doc"]][item["offset"]:].startswith(item["context"] + item["target"])
    assert SOURCES["items"] == {"code_mc": 200, "prose_cloze": 126, "pycode_bpb": 96}


def test_bpb_docs_are_train_py_validation_windows(enc):
    import zip2zip
    from lib.loader import eval_windows
    val = val_ids("pycode")
    windows = eval_windows(val, 96, 256, zip2zip.GPTConfig(block_size=256, max_subtokens=1),
                           prepare.token_byte_lengths(enc))
    docs = shipped("pycode_bpb")
    assert len(docs) == len(windows) == 96
    for doc, (codes, n_base, n_bytes) in zip(docs, windows):
        assert doc["text"] == enc.decode(codes[1:]) and (doc["n_base"], doc["n_bytes"]) == (n_base, n_bytes)
        assert doc["round_trip"] == (enc.encode(doc["text"], allowed_special={"<|endoftext|>"}) == codes[1:])
        # the one way text bytes and train.py's differ here: a literal EOT, 13 bytes of text
        assert doc["text_bytes"] == n_bytes + 13 * doc["n_eot"]


def test_prepare_rebuilds_the_shipped_files(tmp_path):
    val_ids("pycode"), val_ids("prose")
    prepare.prepare(tmp_path)
    for name in ("code_mc", "prose_cloze", "pycode_bpb", "sources"):
        ext = "json" if name == "sources" else "jsonl"
        assert (tmp_path / f"{name}.{ext}").read_bytes() == (TASKS / f"{name}.{ext}").read_bytes(), name


def test_prepare_names_the_missing_val_bin(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "REPO", tmp_path)
    with pytest.raises(SystemExit, match=r"^error: .*data/pycode/val.bin is missing: run python data/pycode/prepare.py first$"):
        prepare.main([f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()

# -----------------------------------------------------------------------------
# through lm-eval


@pytest.fixture(scope="module")
def task_manager():
    pytest.importorskip("lm_eval")
    os.environ["HF_DATASETS_OFFLINE"] = "1"   # nothing here may reach for the network
    from lm_eval.tasks import TaskManager
    # include_defaults=False: indexing lm-eval's own thousands of tasks takes seconds, and no
    # test needs them
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def test_tasks_load_from_any_folder(task_manager, tmp_path, monkeypatch):
    from lm_eval.tasks import get_task_dict
    monkeypatch.chdir(tmp_path)   # the data files resolve from tasks/, not from the cwd
    tasks = task_manager.load(["zip2zip_offline"])["tasks"]      # the tag runs all three
    assert set(tasks) == set(NAMES)
    for name, (file, output_type) in NAMES.items():
        task = tasks[name]
        assert task.OUTPUT_TYPE == output_type
        assert [dict(d) for d in task.test_docs()] == shipped(file)
    with warnings.catch_warnings():   # lm-eval 0.4.13 deprecates it for TaskManager.load, used above
        warnings.simplefilter("ignore", DeprecationWarning)
        assert set(get_task_dict(list(NAMES), task_manager)) == set(NAMES)


class DummyLM:
    """Made a subclass of lm_eval's LM in dummy_lm(): log-likelihood -len(continuation), never
    greedy; rolling: -len(text). It keeps the requests it was asked."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def loglikelihood(self, requests):
        self.asked += [r.args for r in requests]
        return [(-float(len(cont)), False) for _, cont in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests):
        self.asked += [r.args for r in requests]
        return [-float(len(r.args[0])) for r in requests]

    def generate_until(self, requests):
        raise NotImplementedError


def test_a_dummy_model_runs_all_three(task_manager):
    import lm_eval
    from lm_eval.api.model import LM
    lm = type("Dummy", (DummyLM, LM), {})()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(NAMES), limit=5, task_manager=task_manager,
                                  bootstrap_iters=0)
    res = out["results"]
    code, cloze, bpb = (shipped(file)[:5] for file, _ in NAMES.values())
    # the requests are the records' text exactly: no delimiter slipped in, nothing stripped
    asked = set(lm.asked)
    assert all((d["query"], c) in asked for d in code for c in d["choices"])
    assert all((d["context"], d["target"]) in asked for d in cloze)
    assert all((d["text"],) in asked for d in bpb)
    # acc: the shortest choice wins; acc_norm (per character): every choice scores -1, the first wins
    shortest = [int(np.argmax([-len(c) for c in d["choices"]])) for d in code]
    assert res["zip2zip_code_mc"]["acc,none"] == pytest.approx(np.mean([s == d["label"] for s, d in zip(shortest, code)]))
    assert res["zip2zip_code_mc"]["acc_norm,none"] == pytest.approx(np.mean([d["label"] == 0 for d in code]))
    assert res["zip2zip_prose_cloze"]["acc,none"] == 0
    assert res["zip2zip_prose_cloze"]["perplexity,none"] == pytest.approx(math.exp(np.mean([len(d["target"]) for d in cloze])))
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in bpb)
    assert res["zip2zip_pycode_bpb"]["bits_per_byte,none"] == pytest.approx(sum(len(d["text"]) for d in bpb) / n_bytes / math.log(2))
    assert {"word_perplexity,none", "byte_perplexity,none"} <= set(res["zip2zip_pycode_bpb"])
