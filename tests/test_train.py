"""train.py (and lib/: adapt.py, loader.py, outdir.py): batches, evaluation, resume, adaptation, GPT-2
mapping, LoRA, DDP, what a run prints and writes, stopping (Ctrl-C, a busy out_dir), bad input.

Tiny models on a tiny data set made from a few standard-library files, CPU only, offline,
writing only to tmp_path.
"""
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import train
import zip2zip
from evals import likelihood
from lib import adapt, cli, loader, meter, outdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
FILES = ["textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "fnmatch.py", "shlex.py",
         "json/encoder.py", "json/decoder.py", "json/__init__.py", "glob.py", "string.py"]


@pytest.fixture(scope="module")
def tok():
    return zip2zip.Tokenizer(max_subtokens=4, max_codebook_size=1024)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):
    """train.bin / val.bin as data/common.py writes them: one EOT before each document."""
    d = tmp_path_factory.mktemp("data")
    docs = [open(os.path.join(STDLIB, f), encoding="utf-8").read() for f in FILES]
    for name, part in (("train", docs[:-2]), ("val", docs[-2:])):
        ids = [t for doc in part for t in [tok.eot] + tok.bpe.encode_ordinary(doc)]
        np.array(ids, dtype=np.uint16).tofile(d / f"{name}.bin")
    return str(d)


def tiny(data_dir, out_dir, *more):
    # the output layer (50257 x n_embd) is most of the cost: keep n_embd and the batch small. On the
    # CPU, also on a machine with CUDA (exact repeats, gloo): the GPU runs are gpu_check.sh's
    return [f"--dataset={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_windows=2",
            "--eval_interval=2", "--log_interval=1", "--max_seconds=0", "--max_iters=4", "--warmup_iters=1",
            "--lr_decay_iters=4", "--sample_tokens=0", "--loader=sync", "--compile=False", *more]


def launch(args):
    """train.py in a process of its own, in its own process group as a shell runs it (Ctrl-C in a
    terminal signals the whole group: the loader's workers too)."""
    return subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_for(p, text):
    timer = threading.Timer(120, p.kill)      # never hang the suite
    timer.start()
    try:
        for line in p.stdout:
            if text in line:
                return
    finally:
        timer.cancel()
    raise AssertionError(f"train.py ended before printing {text!r}: {p.stderr.read()[-3000:]}")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("plain")
    train.main(tiny(data_dir, out, "--max_subtokens=1", "--max_iters=2", "--bias=True"))
    return str(out)


# -----------------------------------------------------------------------------
# data


def test_build_batch_windows_are_canonical(data_dir, tok):
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    conf = zip2zip.GPTConfig(block_size=64, max_subtokens=4, max_codebook_size=1024)
    starts = [0, 1000, 5000, len(data) - 40]            # the last one runs into the end of the data
    x, y, hyper, n_bytes = train.build_batch(data, starts, 64, conf, tok.byte_lengths)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
    real = y[:, 1:] >= 0                                  # x[:, t+1] is a code of the window
    assert torch.equal(y[:, :-1][real], x[:, 1:][real])   # y is x shifted
    expect_bytes = 0
    for row, s in enumerate(starts):
        codes = x[row].tolist()[:1] + [c for c in y[row].tolist() if c >= 0]
        ids = zip2zip.lzw_decode(codes, 50257, 1024, 4, conf.disabled_ids)
        assert ids == data[s:s + len(ids)].tolist()                               # the window's text
        assert codes == zip2zip.lzw_encode(ids, 50257, 1024, 4, conf.disabled_ids)[:len(codes)]  # canonical
        expect_bytes += sum(len(tok.token_bytes[t]) for t in ids[1:] if t != tok.eot)
    assert (y[3] == -1).any() and len(zip2zip.lzw_decode(  # padded, and nothing before the end lost
        x[3].tolist()[:1] + [c for c in y[3].tolist() if c >= 0], 50257, 1024, 4, conf.disabled_ids)) == 40
    assert n_bytes == expect_bytes
    ref = zip2zip.hyper_batch(x.tolist(), 50257, 1024, 4, conf.disabled_ids)
    assert all(torch.equal(getattr(hyper, f), getattr(ref, f)) for f in loader.HYPER_FIELDS)
    _, _, plain_hyper, _ = train.build_batch(data, starts, 64, zip2zip.GPTConfig(max_subtokens=1), tok.byte_lengths)
    assert plain_hyper is None


@pytest.mark.parametrize("kind,workers", [("thread", 2), ("process", 1)])
def test_batches_deterministic_whatever_the_loader(data_dir, tok, kind, workers):
    conf = zip2zip.GPTConfig(block_size=32, max_subtokens=4)
    job = dict(first=6, accum=2, seed=7, rank=0, batch_size=3, mconf=conf, byte_lengths=tok.byte_lengths)
    path = os.path.join(data_dir, "train.bin")
    runs = []
    for k, n in (("sync", 1), (kind, workers)):
        b = loader.Batches(path, job, k, n, train.get_batch)
        try:
            runs.append([b.next() for _ in range(5)])
            assert b.speed() > 0                                 # codes per second the workers build
        finally:
            b.close()
    fields = [f.name for f in dataclasses.fields(zip2zip.HyperBatch)]   # all of them, whatever they are
    for (x1, y1, h1, n1), (x2, y2, h2, n2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and n1 == n2
        assert all(torch.equal(getattr(h1, f), getattr(h2, f)) for f in fields)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])      # different steps, different windows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_reach_cuda_through_pinned_memory(data_dir, tok, monkeypatch):
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    x, y, hyper, _ = train.build_batch(data, [0, 999], 32, zip2zip.GPTConfig(block_size=32), tok.byte_lengths)
    pinned, pin = [], torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t) or pin(t, *a))
    x2, y2, hyper2 = loader.to_device(x, y, hyper, "cuda")
    fields = [f.name for f in dataclasses.fields(zip2zip.HyperBatch)]
    assert len(pinned) == 2 + len(fields)
    assert all(t.is_cuda for t in [x2, y2] + [getattr(hyper2, f) for f in fields])
    assert all(torch.equal(getattr(hyper2, f).cpu(), getattr(hyper, f)) for f in fields)


def test_eval_matches_model_nll_on_the_same_text(data_dir, tok):
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    torch.manual_seed(0)
    model = zip2zip.GPT(zip2zip.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, max_subtokens=4))
    windows = loader.eval_windows(val, 5, 32, model.config, tok.byte_lengths)
    plain = loader.eval_windows(val, 5, 32, zip2zip.GPTConfig(block_size=32, max_subtokens=1), tok.byte_lengths)
    assert [w[1:] for w in windows] == [w[1:] for w in plain]          # identical text for every model
    assert all(zip2zip.lzw_decode(w[0], 50257, 1024, 4, (tok.eot,)) == p[0] for w, p in zip(windows, plain))
    m = train.estimate_loss(model, windows, 2, nullcontext())
    nll = sum(likelihood.nll(model, codes) for codes, _, _ in windows)
    assert m["bpb"] == pytest.approx(nll / (math.log(2) * sum(w[2] for w in windows)), rel=1e-5)
    assert m["ratio"] == pytest.approx(sum(len(w[0]) - 1 for w in windows) / (5 * 32))
    assert m == pytest.approx(train.estimate_loss(model, windows, 3, nullcontext()))  # nor batching
    shapes = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    assert m == pytest.approx(train.estimate_loss(model, windows, 2, nullcontext(), static=True), rel=1e-6)
    assert set(shapes) == {(2, 32)}     # training's shapes: a compiled model compiles nothing new
    # multi-view bits per byte: for a canonical model, the canonical figure itself (one stream has
    # probability); unmasked, the segmentations the beam finds sum to more than the canonical one
    mv = train.estimate_loss(model, windows[:2], 2, nullcontext(), beam=2)
    assert mv["bpb_multiview"] == pytest.approx(mv["bpb"], rel=1e-5)
    torch.manual_seed(0)
    unmasked = zip2zip.GPT(zip2zip.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, max_subtokens=4,
                                             canonical=False))
    mv = train.estimate_loss(unmasked, windows[:2], 2, nullcontext(), beam=4)
    assert 0 < mv["bpb_multiview"] < mv["bpb"]


@pytest.mark.parametrize("kind", ["transformer", "mlp", "mean"])
def test_flops_per_batch_counts_what_torch_counts(kind):
    """The estimate behind the MFU in the log, against torch's FLOP counter on one forward and
    backward pass (attention as plain matmuls, so that it counts them), a small vocabulary so that
    the hypertoken parts weigh: within 2% in total, 1% in what zip2zip adds to a plain GPT, for
    every hyper-encoder."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    rng, counted = np.random.default_rng(0), {}
    for M in (1, 4):
        torch.manual_seed(0)
        model = zip2zip.GPT(zip2zip.GPTConfig(vocab_size=64, disabled_ids=(), block_size=64, n_layer=2, n_head=2,
                                              n_embd=64, bias=False, max_subtokens=M, hyper_n_layer=2,
                                              hyper_n_embd=32, recon_max_entries=64, hyper_encoder=kind))
        rows = [zip2zip.lzw_encode(rng.integers(0, 8, 400).tolist(), 64, 1024, M)[:65] for _ in range(3)]
        x, y = torch.tensor([r[:-1] for r in rows]), torch.tensor([r[1:] for r in rows])
        hyper = model.hyper_batch(x.tolist()) if M > 1 else None
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            model(x, y, hyper=hyper)[1].backward()
        counted[M] = fc.get_total_flops(), meter.flops_per_batch(model, 3, 64, hyper)
    (plain, plain_est), (z, z_est) = counted[1], counted[4]
    assert z_est == pytest.approx(z, rel=0.02) and plain_est == pytest.approx(plain, rel=0.02)
    assert z_est - plain_est == pytest.approx(z - plain, rel=0.01)

# -----------------------------------------------------------------------------
# training


def test_a_few_steps_lower_the_loss(data_dir, tmp_path):
    out = train.main(tiny(data_dir, tmp_path, "--max_iters=8", "--eval_interval=8", "--learning_rate=2e-2",
                          "--lr_decay_iters=8"))
    losses = [lm for _, lm, _ in out["history"]]
    assert losses[-1] < losses[0] - 1.0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)           # plain data only: no pickled objects
    assert ckpt["iter_num"] == 8 and ckpt["config"]["max_subtokens"] == 4 and out["val"]["bpb"] > 0
    model, _ = cli.load_checkpoint(str(tmp_path))                         # the one loader reads it
    assert model.config.max_subtokens == 4
    log = json.loads((tmp_path / "log.json").read_text())                 # the curves, for plots
    assert log["config"] == ckpt["config"]
    assert [e["iter"] for e in log["evals"]] == [0, 8] and log["evals"][-1]["bpb"] == out["val"]["bpb"]
    assert set(log["evals"][0]) == {"iter", "train_seconds", "loss", "bpb", "ratio", "bytes_per_code"}
    assert [(e["iter"], e["loss"]) for e in log["train"]] == [(i, lm) for i, lm, _ in out["history"]]
    assert 0 < log["train"][0]["train_seconds"] < log["evals"][-1]["train_seconds"] == ckpt["train_seconds"]


@pytest.mark.parametrize("mode,n", [("scratch", 4), ("lora", 2)])
def test_resume_continues_the_same_curve(data_dir, plain_dir, tmp_path, mode, n):
    more = ["--dropout=0.1", "--gradient_accumulation_steps=2", f"--max_iters={n}", f"--lr_decay_iters={n}",
            f"--eval_interval={n // 2}"]     # dropout and the recon subsample draw random numbers
    more += ["--loader=thread", "--num_workers=2"] if mode == "scratch" else [f"--init_from={plain_dir}", "--lora_rank=2"]
    # bit-equal on the CPU (tiny's --device=cpu); on a GPU the Triton backward's atomic adds need not repeat
    straight = train.main(tiny(data_dir, tmp_path / "a", *more))
    half = train.main(tiny(data_dir, tmp_path / "b", *more, f"--max_iters={n // 2}"))
    rest = train.main(tiny(data_dir, tmp_path / "b", *more, "--init_from=resume"))
    assert half["history"] + rest["history"] == straight["history"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    a, b = (json.loads((tmp_path / d / "log.json").read_text()) for d in "ab")    # one log, continued
    curve = lambda log: ([(e["iter"], e["bpb"]) for e in log["evals"]], [(e["iter"], e["loss"]) for e in log["train"]])
    assert curve(a) == curve(b) and [e["iter"] for e in a["evals"]] == [0, n // 2, n]


def test_adapt_from_plain_loads_every_base_weight(data_dir, plain_dir, tmp_path):
    source = torch.load(os.path.join(plain_dir, "ckpt.pt"), weights_only=True)["model"]
    cfg = train.TrainConfig(init_from=plain_dir, block_size=8, n_layer=3, max_subtokens=4)
    mconf = train.model_config(cfg)
    given = dataclasses.replace(cfg)
    model, adapted = adapt.make_model(cfg, mconf)
    assert adapted.n_layer == 1 and adapted.bias is True            # the source's architecture
    assert cfg == given and mconf.n_layer == 3                      # in a copy: what was given is unchanged
    assert model.config.hyper_width == zip2zip.GPTConfig(n_embd=16, n_head=2).hyper_width == 4   # derived from it too
    state = model.state_dict()
    base = [k for k in state if not k.startswith(adapt.HYPER_PARTS)]
    assert sorted(base) == sorted(source)
    for k in base:
        expect = source[k][:8] if k == "transformer.wpe.weight" else source[k]    # context cropped
        assert torch.equal(state[k], expect), k
    assert any(k.startswith("hyper_in.") for k in state) and "recon" in state
    del source["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match="mlp.c_fc.weight"):
        adapt.load_base_weights(zip2zip.GPT(mconf), source)
    out = train.main(tiny(data_dir, tmp_path, f"--init_from={plain_dir}", "--max_iters=1"))   # and it trains
    assert out["iter_num"] == 1


def test_gpt2_weight_mapping_round_trips():
    """A random state dict in Hugging Face's GPT-2 format (Conv1D weights are (in, out))."""
    g = torch.Generator().manual_seed(0)
    L, d, V, P = 2, 16, 50257, 1024
    r = lambda *shape: torch.randn(*shape, generator=g)
    hf = {"transformer.wte.weight": r(V, d), "transformer.wpe.weight": r(P, d),
          "transformer.ln_f.weight": r(d), "transformer.ln_f.bias": r(d)}
    for i in range(L):
        h = f"transformer.h.{i}."
        hf.update({h + "ln_1.weight": r(d), h + "ln_1.bias": r(d), h + "ln_2.weight": r(d), h + "ln_2.bias": r(d),
                   h + "attn.c_attn.weight": r(d, 3 * d), h + "attn.c_attn.bias": r(3 * d),
                   h + "attn.c_proj.weight": r(d, d), h + "attn.c_proj.bias": r(d),
                   h + "mlp.c_fc.weight": r(d, 4 * d), h + "mlp.c_fc.bias": r(4 * d),
                   h + "mlp.c_proj.weight": r(4 * d, d), h + "mlp.c_proj.bias": r(d),
                   h + "attn.bias": torch.ones(1, 1, P, P).tril(), h + "attn.masked_bias": torch.tensor(-1e4)})
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    ours = adapt.gpt2_state_from_hf(hf)
    weights = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    back = adapt.gpt2_state_to_hf(ours)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    model = zip2zip.GPT(zip2zip.GPTConfig(block_size=64, n_layer=L, n_head=2, n_embd=d, bias=True, max_subtokens=4))
    assert {k.split(".")[0] for k in adapt.load_base_weights(model, ours)} == {"hyper_in", "hyper_out", "recon"}
    x = r(3, 4 * d)
    for i in range(L):   # every linear computes what HF's Conv1D computes: x @ W + b
        block, h = model.transformer.h[i], f"transformer.h.{i}."
        for lin, name in ((block.attn.c_attn, "attn.c_attn"), (block.attn.c_proj, "attn.c_proj"),
                          (block.mlp.c_fc, "mlp.c_fc"), (block.mlp.c_proj, "mlp.c_proj")):
            xi = x[:, :lin.in_features]
            assert torch.allclose(lin(xi), xi @ hf[h + name + ".weight"] + hf[h + name + ".bias"], atol=1e-5)
    no_prefix = {k.removeprefix("transformer."): v for k, v in hf.items() if k != "lm_head.weight"}   # GPT2Model
    assert all(torch.equal(adapt.gpt2_state_from_hf(no_prefix)[k], v) for k, v in ours.items())


def test_lora_trains_only_what_it_should(data_dir, plain_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, f"--init_from={plain_dir}", "--lora_rank=2", "--lora_alpha=4", "--max_iters=3"))
    src = torch.load(os.path.join(plain_dir, "ckpt.pt"), weights_only=True)["model"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    lora, merged = ckpt["lora"], ckpt["model"]
    for k, v in src.items():
        if k.endswith(adapt.CONV1D):
            A, B = lora[k.replace(".weight", ".lora_A")], lora[k.replace(".weight", ".lora_B")]
            assert torch.equal(lora[k], v)                            # the base weight is frozen
            assert B.abs().sum() > 0                                  # the adapter trained (B starts at 0)
            assert torch.allclose(merged[k], v + 2.0 * B @ A, atol=1e-6)   # folded in: alpha / rank = 2
        else:
            assert torch.equal(merged[k], v), k                       # everything else frozen
    assert merged["hyper_in.proj.weight"].abs().sum() > 0             # the hyper-encoder trains (starts at 0)
    model, _ = cli.load_checkpoint(str(tmp_path))                     # a plain zip2zip checkpoint
    assert not any("lora" in k for k in model.state_dict())
    for change in ("--lora_alpha=8", "--lora_rank=4"):   # the adapters would be rebuilt at another scale
        with pytest.raises(SystemExit, match=r"^error: cannot change on resume: lora_(alpha=8.0 \(the run has 4.0\)|"
                                             r"rank=4 \(the run has 2\))$"):
            train.main(["--init_from=resume", f"--out_dir={tmp_path}", change, "--max_iters=4"])


# no codebook: no batch has a hypertoken, and DDP still needs a gradient for every parameter
@pytest.mark.parametrize("more", [[], ["--max_codebook_size=0"]])
def test_ddp_gloo_two_processes(data_dir, tmp_path, more):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *tiny(data_dir, tmp_path, "--max_iters=3", "--gradient_accumulation_steps=2", "--eval_interval=3", *more)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("step 3: val loss") == 1                    # rank 0 prints
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 3

# -----------------------------------------------------------------------------
# what a user sees


def test_the_log_says_how_fast_and_how_long(data_dir, tmp_path, capsys):
    train.main(tiny(data_dir, tmp_path, "--loader=thread", "--num_workers=1", "--max_seconds=90"))
    out = capsys.readouterr().out
    assert "10 minutes" not in out and "it trains for at most 0:01:30" in out    # what the settings say
    lines = [line for line in out.splitlines() if line.startswith("iter ")]
    # model FLOP/s (on CUDA: TFLOP/s and MFU), how much faster the loader's workers build codes than the
    # steps use them, time since the start and to the end (here: 4 of 4 steps done)
    assert re.search(r", [\d.]+ GFLOP/s, loader [\d.]+x; 0:00:\d\d elapsed, ETA 0:00:00$", lines[-1]), lines[-1]
    assert lines[0].endswith(" elapsed") and all("ETA " in line for line in lines[1:])


def test_the_eta_leaves_out_the_first_steps_warm_up(data_dir, tmp_path, capsys, monkeypatch):
    # a slow first step (compilation, the first batches) made the first ETAs many times too long
    calls, release = [], loader.release_freed_memory
    monkeypatch.setattr(loader, "release_freed_memory", lambda: (calls.append(1), len(calls) == 1 and time.sleep(3),
                                                                 release()))
    train.main(tiny(data_dir, tmp_path, "--eval_interval=4"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    # 2 fast steps and the evaluation at step 4 to go: well under the 3 s the first step's warm-up took
    h, m, s = map(int, lines[1].rsplit("ETA ", 1)[1].split(":"))
    assert "ETA" not in lines[0] and 3600 * h + 60 * m + s < 3, lines


def test_the_eta_counts_the_evaluations_to_come(data_dir, tmp_path, capsys, monkeypatch):
    # 10 steps of 100 taken, 1 s a step, an evaluation every 25 steps, 10 s each
    assert meter.eta_seconds(10, 100, 0, 0, 25, 1.0, 1.0, 10.0) == 90 + 4 * 10      # at 25, 50, 75, 100
    assert meter.eta_seconds(25, 100, 0, 0, 25, 1.0, 1.0, 10.0) == 75 + 4 * 10      # the one at 25 is still due
    assert meter.eta_seconds(26, 100, 0, 0, 25, 1.0, 1.0, 10.0) == 74 + 3 * 10
    assert meter.eta_seconds(90, 95, 0, 0, 25, 1.0, 1.0, 10.0) == 5 + 10             # the last one, at 95
    # a time budget: 30 s of training left at 0.5 s a step (1 s with the rest): 60 steps, to step 70
    assert meter.eta_seconds(10, 10 ** 6, 100, 70, 25, 1.0, 0.5, 10.0) == 60 + 3 * 10   # at 25, 50, 70
    # and train.py's log: evaluations at steps 0, 2 and 4 that take 1 s each or more; after step 2,
    # two of them are still to come
    evaluate = train.estimate_loss
    monkeypatch.setattr(train, "estimate_loss", lambda *a, **k: (time.sleep(1), evaluate(*a, **k))[1])
    train.main(tiny(data_dir, tmp_path, "--eval_interval=2"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("iter 2:"))
    h, m, s = map(int, line.rsplit("ETA ", 1)[1].split(":"))
    assert 3600 * h + 60 * m + s >= 2, line


def test_resuming_a_finished_run_says_so_and_how_to_go_on(data_dir, tmp_path, capsys):
    train.main(tiny(data_dir, tmp_path, "--max_iters=2"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--init_from=resume", f"--out_dir={tmp_path}"])["iter_num"] == 2
    out = capsys.readouterr().out
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert f"{tmp_path / 'ckpt.pt'} is at step 2: --max_iters=2 is reached, nothing to train. To train longer: " in out
    command = shlex.split(out.split("To train longer: ")[1].splitlines()[0])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--max_iters=4"
    assert train.main(command[2:])["iter_num"] == 4


def test_max_iters_0_evaluates_and_saves_nothing(data_dir, tmp_path, capsys):
    out = train.main(tiny(data_dir, tmp_path, "--max_iters=0"))
    assert out["iter_num"] == 0 and out["val"]["bpb"] > 0
    assert "--max_iters=0: evaluated the model as it starts, trained nothing, saved nothing" in capsys.readouterr().out
    assert not {"ckpt.pt", "log.json"} & set(os.listdir(tmp_path))

# -----------------------------------------------------------------------------
# stopping: Ctrl-C, a busy out_dir


def test_ctrl_c_saves_the_step_and_prints_the_command_that_resumes(data_dir, tmp_path):
    more = ["--max_iters=100000", "--eval_interval=100000", "--loader=process", "--num_workers=1"]
    p = launch(tiny(data_dir, tmp_path / "run", *more))
    wait_for(p, "iter 3:")
    os.killpg(p.pid, signal.SIGINT)            # Ctrl-C in a terminal: the main process and its workers
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "stopping after this step" in err, err
    k = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"]
    assert f"stopped at step {k}, saved in {tmp_path / 'run' / 'ckpt.pt'}; to continue: " in out
    command = shlex.split(out.split("to continue: ")[1].splitlines()[0])
    assert command == ["python", "train.py", "--init_from=resume", f"--out_dir={tmp_path / 'run'}"]
    resumed = train.main(command[2:] + [f"--max_iters={k + 2}", "--loader=sync"])
    straight = train.main(tiny(data_dir, tmp_path / "straight", *more[1:], f"--max_iters={k + 2}"))
    assert resumed["history"][0][0] == k + 1 and resumed["history"] == straight["history"][-len(resumed["history"]):]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("run", "straight"))
    assert all(torch.equal(a[key], b[key]) for key in a)         # as if never interrupted


def test_a_second_ctrl_c_quits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    for ddp in (False, True):
        exits.clear()
        stop = outdir.Interrupt(ddp)
        try:
            os.kill(os.getpid(), signal.SIGINT)    # handled in this (the main) thread, before kill returns
            assert stop.requested and exits == []  # the first: stop after this step
            os.kill(os.getpid(), signal.SIGINT)
            assert exits == ([] if ddp else [130])  # DDP: torchrun's copy of the same press is no second one
            stop.at -= 2
            os.kill(os.getpid(), signal.SIGINT)
            assert exits[-1] == 130
        finally:
            stop.restore()


def test_a_busy_out_dir_is_refused_but_a_killed_runs_lock_is_no_obstacle(data_dir, tmp_path):
    p = launch(tiny(data_dir, tmp_path, "--max_iters=100000", "--eval_interval=100000"))
    try:
        wait_for(p, "iter 2:")
        with pytest.raises(SystemExit) as e:
            train.main(tiny(data_dir, tmp_path, "--overwrite=True"))
        assert str(e.value) == (f"error: --out_dir={tmp_path} is in use by another training (process {p.pid}): "
                                f"wait for it to end, or choose another --out_dir")
    finally:
        p.kill()                               # SIGKILL: no clean-up at all; train.lock stays behind
        p.communicate()
    assert (tmp_path / "train.lock").exists()
    assert train.main(tiny(data_dir, tmp_path, "--overwrite=True", "--max_iters=1"))["iter_num"] == 1
    assert not (tmp_path / "train.lock").exists()   # a run that ends removes it


def test_two_writers_never_share_a_temporary_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")

    def slow_writer(f):
        f.write(b"first")
        outdir.atomic_write(path, lambda g: g.write(b"second"))   # another writer, meanwhile
    outdir.atomic_write(path, slow_writer)
    assert open(path, "rb").read() == b"first" and os.listdir(tmp_path) == ["ckpt.pt"]

# -----------------------------------------------------------------------------
# bad input: a clear message, nothing lost


# the settings a checkpoint of train.py holds: a flat dict of these (as every version has written them)
SAVED_SETTINGS = ["out_dir", "init_from", "overwrite", "eval_interval", "eval_windows", "log_interval", "eval_only",
                  "eval_beam", "sample_tokens", "dataset", "batch_size", "gradient_accumulation_steps", "loader",
                  "num_workers", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "max_subtokens",
                  "max_codebook_size", "canonical", "hyper_encoder", "hyper_n_layer", "hyper_n_embd", "hyper_n_head",
                  "tie_weights", "recon_lambda", "recon_max_entries", "no_digit_merges", "lora_rank", "lora_alpha",
                  "learning_rate", "max_iters", "max_seconds", "weight_decay", "beta1", "beta2", "grad_clip",
                  "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr", "device", "dtype", "compile", "threads",
                  "seed"]


def test_a_checkpoint_of_the_earlier_format_resumes(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, "--max_iters=2"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(SAVED_SETTINGS) <= set(ckpt["config"]) and not any(isinstance(v, dict) for v in ckpt["config"].values())
    ckpt["config"] = {k: ckpt["config"][k] for k in SAVED_SETTINGS}     # exactly what the earlier train.py wrote
    torch.save(ckpt, tmp_path / "ckpt.pt")
    out = train.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=3"])
    assert out["iter_num"] == 3


def test_the_model_settings_are_gptconfigs_checked_by_it(monkeypatch):
    model_fields = {f.name for f in dataclasses.fields(zip2zip.GPTConfig)} - {"vocab_size", "disabled_ids"}
    cfg = train.TrainConfig()
    assert set(train.MODEL_FIELDS) == model_fields
    for f in dataclasses.fields(zip2zip.GPTConfig):   # GPTConfig's defaults, but where the main job says why not
        if f.name in model_fields:
            assert getattr(cfg, f.name) == train.MAIN_JOB.get(f.name, (f.default,))[0]
    assert all(why for _, why in train.MAIN_JOB.values())
    # the check is GPTConfig's own: whatever it refuses, train.py refuses in one line naming the flag
    def refuse(self):
        if self.n_layer == 5:
            raise ValueError("n_layer=5: refused by GPTConfig")
    monkeypatch.setattr(zip2zip.GPTConfig, "__post_init__", refuse)
    with pytest.raises(ValueError, match=r"^--n_layer=5: refused by GPTConfig$"):
        train.read_config(["--n_layer=5"], cuda=False, world=1)


@pytest.mark.parametrize("args,message", [
    (["--no_such_key=1"], "unknown key 'no_such_key'"),
    (["--batch_size=abc"], "expected int"),
    (["--learning_rate=fast"], "expected float"),
    (["--loader=fast"], "--loader='fast': expected process, thread or sync"),
    # the model's settings are checked by GPTConfig, in its words, with the flags named
    (["--n_head=3"], ("--n_head=3", "--n_embd=16")),
    (["--hyper_n_embd=10"], ("--hyper_n_head=4", "--hyper_n_embd=10")),
    (["--n_layer=-1"], ("--n_layer=-1",)),
    (["--n_layer=0"], ("--n_layer=0",)),
    (["--n_embd=0"], ("--n_embd=0",)),
    (["--n_head=0"], ("--n_head=0",)),
    (["--hyper_n_embd=-4"], "--hyper_n_embd=-4: expected 0 (n_embd // 4) or more"),
    (["--threads=-1"], "--threads=-1: expected 0"),
    (["--learning_rate=-0.1"], "--learning_rate=-0.1: expected 0 or more"),
    (["--num_workers=-1"], "--num_workers=-1: expected 0"),
    (["--device=bogus"], "--device=bogus: unknown device; expected auto, cpu, cuda, cuda:N or mps"),
    (["--device=bogus", "--init_from=resume"], "--device=bogus: unknown device"),     # not blamed on the checkpoint
    (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps=0: expected a positive multiple"),
    (["config/nope.py"], "preset 'config/nope.py' not found"),
    (["stray"], "unexpected arguments ['stray']"),
    (["--init_from=/no/such/folder"], "no checkpoint at '/no/such/folder'"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--eval_windows=100000"], "val.bin holds only"),
])
def test_bad_input_is_a_clear_error(data_dir, tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(tiny(data_dir, tmp_path, *args))
    parts = (message,) if isinstance(message, str) else message
    assert str(e.value).startswith("error: ") and all(p in str(e.value) for p in parts) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,bad,message", [
    ("train.bin", "id", "is 60000, not a base id (< 50257)"),     # mid-file: no batch of a short run meets it
    ("val.bin", "id", "is 60000, not a base id (< 50257)"),       # between the evaluation windows
    ("train.bin", b"", ": 0 bytes; expected uint16 token ids"),
    ("val.bin", b"\x01\x02\x03", ": 3 bytes; expected uint16 token ids"),
])
def test_bad_token_files_fail_before_training(data_dir, tmp_path, capsys, name, bad, message):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    if bad == "id":
        ids = np.fromfile(d / name, dtype=np.uint16)
        ids[len(ids) // 2] = 60000
        ids.tofile(d / name)
    else:
        (d / name).write_bytes(bad)
    with pytest.raises(SystemExit) as e:
        train.main(tiny(str(d), tmp_path / "out"))
    assert str(e.value).startswith(f"error: {d / name}") and message in str(e.value)
    assert "iter " not in capsys.readouterr().out


def test_an_unwritable_out_dir_fails_before_training(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")         # (root may write anywhere: a file in the path stops it too)
    with pytest.raises(SystemExit) as e:
        train.main(tiny(data_dir, tmp_path / "file" / "out"))
    assert str(e.value) == f"error: --out_dir={tmp_path / 'file' / 'out'}: cannot write there (Not a directory)"
    assert "iter " not in capsys.readouterr().out


def test_nothing_saved_is_lost(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, "--max_iters=2"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="exists: continue it with --init_from=resume"):
        train.main(tiny(data_dir, tmp_path))
    with pytest.raises(SystemExit, match="cannot change on resume: n_layer=2"):
        train.main(tiny(data_dir, tmp_path, "--init_from=resume", "--n_layer=2"))
    with pytest.raises(Exception):   # a save that fails halfway (unpicklable) leaves the old file whole
        outdir.save_checkpoint({"model": lambda: 0}, str(tmp_path))
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.json"]   # no temporary file, and no lock once done


def test_a_masked_training_target_fails_loudly(data_dir, tmp_path, monkeypatch):
    # the loader's batches are canonical, so no target is ever masked; if one were (a bug, or codes
    # from another codec), the run stops with a line instead of training on an infinite loss
    def corrupt(data, starts, block_size, mconf, byte_lengths):
        x, y, hyper, n = build(data, starts, block_size, mconf, byte_lengths)
        t = int((hyper.n_installed[0] < hyper.n_installed[0, -1] - 1).nonzero()[0])   # a hypertoken id not yet made
        y[0, t] = mconf.vocab_size + int(hyper.n_installed[0, -1]) - 1
        return x, y, hyper, n
    build = train.build_batch
    monkeypatch.setattr(train, "build_batch", corrupt)
    with pytest.raises(SystemExit, match="step 1: the training loss is inf: a target lies outside"):
        train.main(tiny(data_dir, tmp_path, "--max_iters=2", "--block_size=64"))


def test_no_codebook_at_all_trains_and_evaluates(data_dir, tmp_path):
    # M > 1 with no room for a single entry: no batch ever has a hypertoken (once a crash at the
    # first evaluation); the model is then a plain GPT with an unused hyper-encoder
    out = train.main(tiny(data_dir, tmp_path, "--max_codebook_size=0", "--max_iters=2", "--eval_interval=1"))
    assert out["iter_num"] == 2 and out["val"]["ratio"] == 1.0 and math.isfinite(out["val"]["bpb"])
