"""train.py: batches, evaluation, resume, adaptation, GPT-2 mapping, LoRA, DDP, bad input.

Tiny models on a tiny data set made from a few standard-library files, CPU only, offline,
writing only to tmp_path.
"""
import math
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import cli
import train
import zip2zip

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
    # the output layer (50257 x n_embd) is most of the cost: keep n_embd and the batch small
    return [f"--dataset={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_windows=2",
            "--eval_interval=2", "--log_interval=1", "--max_seconds=0", "--max_iters=4", "--warmup_iters=1",
            "--lr_decay_iters=4", "--sample_tokens=0", "--loader=sync", "--compile=False", *more]


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
    assert all(torch.equal(getattr(hyper, f), getattr(ref, f)) for f in train.HYPER_FIELDS)
    _, _, plain_hyper, _ = train.build_batch(data, starts, 64, zip2zip.GPTConfig(max_subtokens=1), tok.byte_lengths)
    assert plain_hyper is None


@pytest.mark.parametrize("kind,workers", [("thread", 2), ("process", 1)])
def test_batches_deterministic_whatever_the_loader(data_dir, tok, kind, workers):
    conf = zip2zip.GPTConfig(block_size=32, max_subtokens=4)
    job = dict(first=6, accum=2, seed=7, rank=0, batch_size=3, mconf=conf, byte_lengths=tok.byte_lengths)
    path = os.path.join(data_dir, "train.bin")
    runs = []
    for k, n in (("sync", 1), (kind, workers)):
        b = train.Batches(path, job, k, n)
        try:
            runs.append([b.next() for _ in range(5)])
        finally:
            b.close()
    for (x1, y1, h1, n1), (x2, y2, h2, n2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and n1 == n2
        assert all(torch.equal(getattr(h1, f), getattr(h2, f)) for f in train.HYPER_FIELDS)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])      # different steps, different windows


def test_eval_matches_model_nll_on_the_same_text(data_dir, tok):
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    torch.manual_seed(0)
    model = zip2zip.GPT(zip2zip.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, max_subtokens=4))
    windows = train.eval_windows(val, 5, 32, model.config, tok.byte_lengths)
    plain = train.eval_windows(val, 5, 32, zip2zip.GPTConfig(block_size=32, max_subtokens=1), tok.byte_lengths)
    assert [w[1:] for w in windows] == [w[1:] for w in plain]          # identical text for every model
    assert all(zip2zip.lzw_decode(w[0], 50257, 1024, 4, (tok.eot,)) == p[0] for w, p in zip(windows, plain))
    m = train.estimate_loss(model, windows, 2, train.nullcontext())
    nll = sum(model.nll(codes) for codes, _, _ in windows)
    assert m["bpb"] == pytest.approx(nll / (math.log(2) * sum(w[2] for w in windows)), rel=1e-5)
    assert m["ratio"] == pytest.approx(sum(len(w[0]) - 1 for w in windows) / (5 * 32))
    assert m == pytest.approx(train.estimate_loss(model, windows, 3, train.nullcontext()))  # nor batching

# -----------------------------------------------------------------------------
# training


def test_a_few_steps_lower_the_loss(data_dir, tmp_path):
    out = train.main(tiny(data_dir, tmp_path, "--max_iters=8", "--eval_interval=8", "--learning_rate=2e-2",
                          "--lr_decay_iters=8"))
    losses = [lm for _, lm, _ in out["history"]]
    assert losses[-1] < losses[0] - 1.0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 8 and ckpt["config"]["max_subtokens"] == 4 and out["val"]["bpb"] > 0
    model, _ = cli.load_checkpoint(str(tmp_path))                         # the one loader reads it
    assert model.config.max_subtokens == 4


@pytest.mark.parametrize("mode,n", [("scratch", 4), ("lora", 2)])
def test_resume_continues_the_same_curve(data_dir, plain_dir, tmp_path, mode, n):
    more = ["--dropout=0.1", "--gradient_accumulation_steps=2", f"--max_iters={n}", f"--lr_decay_iters={n}",
            f"--eval_interval={n // 2}"]     # dropout and the recon subsample draw random numbers
    more += ["--loader=thread", "--num_workers=2"] if mode == "scratch" else [f"--init_from={plain_dir}", "--lora_rank=2"]
    straight = train.main(tiny(data_dir, tmp_path / "a", *more))
    half = train.main(tiny(data_dir, tmp_path / "b", *more, f"--max_iters={n // 2}"))
    rest = train.main(tiny(data_dir, tmp_path / "b", *more, "--init_from=resume"))
    assert half["history"] + rest["history"] == straight["history"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_adapt_from_plain_loads_every_base_weight(data_dir, plain_dir, tmp_path):
    source = torch.load(os.path.join(plain_dir, "ckpt.pt"), weights_only=False)["model"]
    cfg = train.TrainConfig(init_from=plain_dir, block_size=8, n_layer=3, max_subtokens=4)
    mconf = zip2zip.GPTConfig(**{k: getattr(cfg, k) for k in train.MODEL_KEYS})
    model = train.make_model(cfg, mconf)
    assert cfg.n_layer == 1 and cfg.bias is True                    # the source's architecture
    assert model.config.hyper_n_embd == zip2zip.GPTConfig(n_embd=16, n_head=2).hyper_n_embd   # derived from it too
    state = model.state_dict()
    base = [k for k in state if not k.startswith(train.HYPER_PARTS)]
    assert sorted(base) == sorted(source)
    for k in base:
        expect = source[k][:8] if k == "transformer.wpe.weight" else source[k]    # context cropped
        assert torch.equal(state[k], expect), k
    assert any(k.startswith("hyper_in.") for k in state) and "recon" in state
    del source["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match="mlp.c_fc.weight"):
        train.load_base_weights(zip2zip.GPT(mconf), source)
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
    ours = train.gpt2_state_from_hf(hf)
    weights = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    back = train.gpt2_state_to_hf(ours)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    model = zip2zip.GPT(zip2zip.GPTConfig(block_size=64, n_layer=L, n_head=2, n_embd=d, bias=True, max_subtokens=4))
    assert {k.split(".")[0] for k in train.load_base_weights(model, ours)} == {"hyper_in", "hyper_out", "recon"}
    x = r(3, 4 * d)
    for i in range(L):   # every linear computes what HF's Conv1D computes: x @ W + b
        block, h = model.transformer.h[i], f"transformer.h.{i}."
        for lin, name in ((block.attn.c_attn, "attn.c_attn"), (block.attn.c_proj, "attn.c_proj"),
                          (block.mlp.c_fc, "mlp.c_fc"), (block.mlp.c_proj, "mlp.c_proj")):
            xi = x[:, :lin.in_features]
            assert torch.allclose(lin(xi), xi @ hf[h + name + ".weight"] + hf[h + name + ".bias"], atol=1e-5)
    no_prefix = {k.removeprefix("transformer."): v for k, v in hf.items() if k != "lm_head.weight"}   # GPT2Model
    assert all(torch.equal(train.gpt2_state_from_hf(no_prefix)[k], v) for k, v in ours.items())


def test_lora_trains_only_what_it_should(data_dir, plain_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, f"--init_from={plain_dir}", "--lora_rank=2", "--lora_alpha=4", "--max_iters=3"))
    src = torch.load(os.path.join(plain_dir, "ckpt.pt"), weights_only=False)["model"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    lora, merged = ckpt["lora"], ckpt["model"]
    for k, v in src.items():
        if k.endswith(train.CONV1D):
            A, B = lora[k.replace(".weight", ".lora_A")], lora[k.replace(".weight", ".lora_B")]
            assert torch.equal(lora[k], v)                            # the base weight is frozen
            assert B.abs().sum() > 0                                  # the adapter trained (B starts at 0)
            assert torch.allclose(merged[k], v + 2.0 * B @ A, atol=1e-6)   # folded in: alpha / rank = 2
        else:
            assert torch.equal(merged[k], v), k                       # everything else frozen
    assert merged["hyper_in.proj.weight"].abs().sum() > 0             # the hyper-encoder trains (starts at 0)
    model, _ = cli.load_checkpoint(str(tmp_path))                     # a plain zip2zip checkpoint
    assert not any("lora" in k for k in model.state_dict())


def test_ddp_gloo_two_processes(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *tiny(data_dir, tmp_path, "--max_iters=3", "--gradient_accumulation_steps=2", "--eval_interval=3")]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("step 3: val loss") == 1                    # rank 0 prints
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 3

# -----------------------------------------------------------------------------
# bad input: a clear message, nothing lost


@pytest.mark.parametrize("args,message", [
    (["--no_such_key=1"], "unknown key 'no_such_key'"),
    (["--batch_size=abc"], "expected int"),
    (["--learning_rate=fast"], "expected float"),
    (["--loader=fast"], "--loader='fast' is not allowed"),
    (["--n_head=3"], "--n_embd=16 is not allowed"),
    (["config/nope.py"], "preset 'config/nope.py' not found"),
    (["stray"], "unexpected arguments ['stray']"),
    (["--init_from=/no/such/folder"], "no checkpoint at '/no/such/folder'"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--eval_windows=100000"], "val.bin holds only"),
])
def test_bad_input_is_a_clear_error(data_dir, tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(tiny(data_dir, tmp_path, *args))
    assert str(e.value).startswith("error: ") and message in str(e.value)


def test_nothing_saved_is_lost(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, "--max_iters=2"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="exists: continue it with --init_from=resume"):
        train.main(tiny(data_dir, tmp_path))
    with pytest.raises(SystemExit, match="cannot change on resume: n_layer=2"):
        train.main(tiny(data_dir, tmp_path, "--init_from=resume", "--n_layer=2"))
    with pytest.raises(Exception):   # a save that fails halfway (unpicklable) leaves the old file whole
        train.save_checkpoint({"model": lambda: 0}, str(tmp_path))
    assert (tmp_path / "ckpt.pt").read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]
