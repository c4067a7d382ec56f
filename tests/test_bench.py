"""bench.py: its timing helpers pair rounds, and the quick run fills every figure of its JSON. (Its
naive LZW, tests/naive_lzw.py, is checked in tests/test_lzw.py.)"""
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import bench
from zip2zip import lzw_decode, lzw_encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_alternate_pairs_rounds():
    calls = []

    def side(name, work, seconds):
        return lambda: (calls.append(name), (work, seconds))[1]

    rates = bench.alternate({"a": side("a", 6, 2.0), "b": side("b", 1, 1.0)}, rounds=3)
    assert calls == ["a", "b"] * 4                          # a warm-up round, then A B A B A B
    assert rates == {"a": [3.0] * 3, "b": [1.0] * 3}
    assert bench.ratio(rates, "a", "b") == 3.0
    rates = {"a": [1.0, 8.0, 2.0, 4.0], "b": [1.0] * 4}
    assert bench.ratio(rates, "a", "b") == 3.0 and bench.spread(rates, "a", "b") == [1.0, 8.0]
    assert bench.spread(rates, "a", "b", 0.25) == [2.0, 4.0]                 # the quartiles


def numbers(x):
    if isinstance(x, dict):
        return [n for v in x.values() for n in numbers(v)]
    return [x] if isinstance(x, (int, float)) else []


def test_quick_run_writes_every_figure(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = bench.main(["--quick=True", f"--json={path}", "--threads=1", "--fresh=False"])
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report))
    bench.check_filled(data)                                # no None, no NaN anywhere
    assert all(math.isfinite(n) for n in numbers(data))
    codec = data["codec"]
    for what in ("encode", "decode", "batch_encode"):
        assert codec[what]["ours_tokens_per_s"] > 0 and "ours_over_rust" in codec[what]
    assert codec["encode"]["ours_over_naive"] > 0 and codec["encode"]["ours_over_unchecked"] > 0
    for batch in ("batch_1", "batch_8"):
        row = data["decode"][batch]
        assert row["zip2zip_bytes_per_s"] > 0 and row["plain_bytes_per_s"] > 0 and row["ratio"] > 0
        assert row["ratio_spread"][0] <= row["ratio"] <= row["ratio_spread"][1]
        assert row["step_cost"] * row["ratio"] == pytest.approx(row["limit"])
        assert row["zip2zip_steps"] < row["plain_steps"]
        assert 0 < row["plain_ops"] < row["zip2zip_ops"]   # (the budget, at 6 layers: test_model.py)
    for key in ("batch_1_quarter", "batch_1_full", "batch_8_quarter", "batch_8_full"):
        row = data["prefill"][key]
        assert row["ratio_spread"][0] <= row["ratio"] <= row["ratio_spread"][1]
        # the same text on both sides, which the zip2zip model reads in fewer codes
        assert 0 < row["zip2zip_codes"] <= row["plain_tokens"] <= 32 and row["limit"] >= 1
        assert (row["limit_padded"] == row["limit"]) if key.startswith("batch_1") else row["limit_padded"] > 0
        for name in ("zip2zip", "plain"):
            ms = row[f"{name}_ms"]
            assert all(v >= 0 for v in ms.values()) and ms["forward"] > 0 and ms["first step"] > 0
        assert set(row["zip2zip_ms"]) - set(row["plain_ms"]) == {"LZW encode", "hyper-encoder"}
    assert data["prefill"]["batch_1_full"]["plain_tokens"] > data["prefill"]["batch_1_quarter"]["plain_tokens"]
    for name in ("code", "prose"):
        row = data["memory"][name]
        assert row["zip2zip_text_bytes"] > 0 and row["plain_text_bytes"] > 0 and row["text_ratio"] >= 1
        assert row["kv_ratio"] == pytest.approx(1 / row["text_ratio"])   # a slot's keys and values: the same size
        assert row["text_ratio_spread"][0] <= row["text_ratio"] <= row["text_ratio_spread"][1]
        assert row["zip2zip_state_bytes_per_text_byte"] > row["zip2zip_kv_bytes_per_text_byte"]
    e2e = data["e2e"]
    assert e2e["zip2zip_steps"] <= e2e["plain_steps"] and e2e["prompt_bytes"] > 0
    assert e2e["zip2zip_text_bytes"] >= 16 and e2e["plain_text_bytes"] >= 16
    assert e2e["ratio_spread"][0] <= e2e["ratio"] <= e2e["ratio_spread"][1]
    train = data["train"]
    assert isinstance(train, dict), train                   # train.py's build_batch is there
    assert train["zip2zip_bytes_per_s"] > 0 and train["plain_bytes_per_s"] > 0 and train["unmasked_bytes_per_s"] > 0
    if not torch.cuda.is_available():
        assert data["kernels"] == "skipped: no CUDA" and "skipped: no CUDA" in out
    for heading in ("codec:", "decoding:", "prefill:", "memory:", "end to end:", "training:", "kernels:"):
        assert heading in out
    # a quick run's toy sizes carry no targets: it says so, and no table has a target column
    notice, tables = out.splitlines()[1], "\n".join(out.splitlines()[2:])
    assert "carry no targets" in notice and not re.search(">=|<=|target", tables)
    # the codec table's columns stay apart, whatever a cell holds ("not installed" is wide)
    header = next(line for line in out.splitlines() if line.lstrip().startswith("ours"))
    assert header.split() == ["ours", "naive", "rust", "ours/naive", "ours/rust"]
    row = next(line for line in out.splitlines() if line.startswith("encode, 1 a call"))
    cells = re.split(" {2,}", row)                      # a cell holds single spaces at most
    assert len(cells) == 6 and cells[0] == "encode, 1 a call"


def test_each_part_runs_in_a_fresh_process(monkeypatch, capsys):
    # a part's figures come from a process of its own, with this run's settings: memory (not timed)
    # gives the same figures there as here
    cfg = bench.setup(["--quick=True", "--parts=memory"])[0]
    figures, seconds = bench.run_fresh("memory", cfg)
    assert figures == json.loads(json.dumps(bench.bench_memory(cfg, "cpu", bench.Tokenizer()))) and seconds > 0
    # main runs every part so when it runs more than one, and prints their tables here
    calls = []
    monkeypatch.setattr(bench, "run_fresh", lambda part, cfg: (calls.append(part), (figures, 1.0))[1])
    report = bench.main(["--quick=True", "--parts=memory,memory"])
    assert calls == ["memory", "memory"] and report["memory"] == figures
    out = capsys.readouterr().out
    assert "each part in a fresh process" in out and out.count("memory:") == 2
    bench.main(["--quick=True", "--parts=kernels"])                         # one part: this process
    bench.main(["--quick=True", "--parts=kernels,kernels", "--fresh=False"])
    assert calls == ["memory", "memory"]


def test_the_kv_bytes_read_off_the_cache_are_a_hand_count():
    # 2 layers, 32 wide, fp32: a code's keys and values take 2 * 2 * 32 * 4 = 512 bytes; the table
    # holds C + 1 = 13 hyper-embeddings (tied: one table) and 13 trie rows of 3 int64
    from fastgen import StaticStepper
    from tests.test_model import codes_of, tiny
    model = tiny(block_size=16)
    dec = StaticStepper(model, [codes_of(0, model, 5), codes_of(1, model, 5)])
    assert bench.cache_bytes(dec) == [5 * 512] * 2
    dec.advance(dec.next)
    assert bench.cache_bytes(dec) == [6 * 512] * 2
    full = StaticStepper(model, [codes_of(2, model, 16)])        # a full context: every slot
    assert bench.cache_bytes(full) == [16 * 512] == [sum(t.nbytes for t in full.state["k"] + full.state["v"])]
    assert bench.table_bytes(dec) == 13 * 32 * 4 + 13 * 3 * 8
    assert bench.table_bytes(StaticStepper(tiny(block_size=16, max_subtokens=1), [[1, 2]])) == 0


def test_the_end_to_end_text_is_the_windows_own():
    # the prompt is whole codes of the window that tokenize back to its ids; each model's new
    # pieces are the window's own after it, the fewest that spell n_bytes of text
    from zip2zip import GPTConfig, Tokenizer
    tok, config, args = Tokenizer(), GPTConfig(), (50257, 1024, 4, (50256,))
    ids = bench.load_tokens("pycode", "val")[1000:1000 + 256].tolist()
    prompt, new, spelled = bench.e2e_text(tok, ids, config, 100)
    k = len(tok.encode_base(prompt))
    assert tok.encode_base(prompt) == ids[:k] and k >= 64
    head = lzw_encode(ids[:k], *args)
    assert head + new["zip2zip"] == lzw_encode(ids, *args)[:len(head) + len(new["zip2zip"])]
    assert lzw_decode(head + new["zip2zip"], *args) == ids[:k] + spelled["zip2zip"]
    assert new["plain"] == spelled["plain"] == ids[k:k + len(new["plain"])]
    fewer = {"zip2zip": lzw_decode(head + new["zip2zip"][:-1], *args)[k:], "plain": spelled["plain"][:-1]}
    for name in ("zip2zip", "plain"):
        assert tok.n_bytes(spelled[name]) >= 100 > tok.n_bytes(fewer[name])
    with pytest.raises(ValueError, match="--e2e_bytes=100000: more text than the context holds"):
        bench.e2e_text(tok, ids, config, 100000)


def test_bad_options(tmp_path):
    for argv, message in ((["--parts=codec,nope"], "--parts=codec,nope: unknown parts ['nope']; known: codec, "),
                          (["--e2e_bytes=0"], "--e2e_bytes=0: expected 1 or more"),
                          (["--bogus=1"], "unknown key"), (["stray"], "unexpected argument"),
                          (["--rounds=0"], "--rounds=0: expected 1 or more"),
                          (["--decode_batches=1,x"], "--decode_batches=1,x: expected batch sizes like 1,8"),
                          (["--device=gpu"], "--device=gpu: unknown device"),
                          (["--n_head=5"], "n_embd=384 is not a multiple of n_head=5"),
                          (["--n_layer=0"], "n_layer=0: must be >= 1"),
                          ([f"--json={tmp_path}/no/such/folder/b.json"], "expected a file in a folder that exists")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert str(e.value).startswith("error: ") and message in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
def test_kernels_on_cuda():
    cfg = bench.BenchConfig(**{**bench.QUICK, "rounds": 1})
    result = bench.bench_kernels(cfg, "cuda")
    assert all(row["speedup"] > 0 for row in result.values())


def test_reproduce_small(tmp_path, capsys):
    # evals/reproduce.py on a slice of the data, with a tiny plain and zip2zip checkpoint (untrained)
    import dataclasses

    from evals import reproduce
    from zip2zip import GPT, GPTConfig
    for M in (1, 4):
        cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, max_subtokens=M)
        (tmp_path / f"m{M}").mkdir()
        ckpt = {"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg)}
        torch.save(ckpt, tmp_path / f"m{M}" / "ckpt.pt")
    reproduce.main(["--max_tokens=20000", "--train_row=False", "--decode=False", "--eval_windows=4",
                    "--codebook_sizes=64,1024", str(tmp_path / "m4"), str(tmp_path / "m1"), str(tmp_path / "none")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| code (pycode val) |")]
    assert len(rows) == 5 and rows[0].endswith("| 1.000 | +0.0% |")      # M=1 is the base stream
    assert f"skipped {tmp_path / 'none'}: no checkpoint" in out
    assert out.count(f"| {tmp_path / 'm'}") == 2 and "- Bits per byte: zip2zip" in out
    assert "- Code, M=4: sequence length" in out
    assert len([line for line in out.splitlines() if line.startswith("| prose (pydoc topics) |")]) == 5


def test_reproduce_bad_options():
    from evals import reproduce
    for argv, message in ((["--codebook_sizes=64,x"], "--codebook_sizes=64,x: expected sizes like 64,256,1024"),
                          (["--windows=0"], "--windows=0: expected window lengths"),
                          (["--eval_windows=0"], "--eval_windows=0: expected 1 or more"), (["--bogus=1"], "unknown key")):
        with pytest.raises(SystemExit) as e:
            reproduce.main(argv)
        assert str(e.value).startswith("error: ") and message in str(e.value)


def test_reproduce_training_sets_quick(tmp_path, capsys):
    # the exact-likelihood and ablation sets on tiny models (2 steps a run): every table is filled,
    # the curves are written, and a second call reuses the finished runs instead of training again
    from evals import reproduce
    runs = str(tmp_path / "runs")
    out = reproduce.main(["--likelihood", "--ablations", "--quick", f"--runs={runs}"])
    text = capsys.readouterr().out
    lik, abl = out["likelihood"], out["ablations"]
    assert set(lik) == {"plain", "unmasked", "canonical", "plain-more", "adapt-unmasked", "adapt-canonical",
                        "lora-unmasked", "lora-canonical"}
    mv = lik["unmasked"]["multiview"]
    assert all(v > 0 for v in mv.values()) and mv[16] <= mv[1] + 1e-9          # a wider beam finds more
    assert mv[16] < lik["unmasked"]["val"]["bpb"]                            # more than the canonical path
    assert lik["canonical"]["multiview"] == {1: None, 4: None, 16: None}     # exact already: not computed
    assert lik["canonical"]["noncanonical_samples"] == 0
    assert set(abl["bpb"]) == set(reproduce.ABLATIONS) and abl["spread"] >= 0
    assert "### Exact likelihood" in text and "### Ablations" in text and "richest in digits" in text
    assert (tmp_path / "runs" / "curves.csv").read_text().count("\n") > len(reproduce.ABLATIONS)
    reproduce.main(["--ablations", "--quick", f"--runs={runs}"])
    assert capsys.readouterr().out.count("reusing ") == len(reproduce.ABLATIONS)


def test_gpu_check_plumbing_on_the_cpu(tmp_path):
    # gpu_check.sh is the one prepared command for a GPU: its smoke mode runs every step of it on
    # the CPU with tiny settings, so that the day a GPU runs it, it does not fail on a typo. One
    # part is made to fail (a `python` on the PATH that refuses the compiled decoding part): the
    # others still run, and the JSON holds what they measured and what the failing one printed.
    out, shim = tmp_path / "gpu_check.json", tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text('#!/bin/sh\ncase "$*" in *--parts=decode*--compile=True*) echo "injected failure"; '
                                 f'exit 3;; esac\nexec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    p = subprocess.run(["bash", os.path.join(ROOT, "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "GPU_CHECK_SMOKE": "1", "OMP_NUM_THREADS": "1",
                            "PATH": f"{shim}:{os.environ['PATH']}"})
    assert p.returncode == 1 and "failed: decode_compiled" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report) == {"parts", "bench", "decode", "efficiency_False", "efficiency_True", "train"}
    assert {k: v["exit_status"] for k, v in report["parts"].items()} == \
        {"bench": 0, "decode": 0, "decode_compiled": 3, "efficiency_False": 0, "efficiency_True": 0, "train_True": 0,
         "train_False": 0}
    for compile in ("False", "True"):   # prefill, memory and end to end, eager and compiled
        assert {"prefill", "memory", "e2e"} <= set(report[f"efficiency_{compile}"])
    assert "injected failure" in report["parts"]["decode_compiled"]["output_tail"]
    assert report["decode"]["batch_1"]["ratio"] > 0 and report["decode"]["batch_8"]["zip2zip_ops"] > 0
    for compile in ("True", "False"):
        steps = report["train"][f"compile_{compile}"]
        assert [s["iter"] for s in steps] == [1, 2] and all(s["codes_per_s"] > 0 for s in steps)
        assert steps[0]["flops"].endswith("FLOP/s") and report["train"][f"compile_{compile}_val"]["bpb"] > 0
