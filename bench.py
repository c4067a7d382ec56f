"""
How fast zip2zip is, side by side with what it replaces, in one run:

1. codec: our LZW encoder and decoder in base tokens per second, against a naive tuple-dict LZW
   (DESIGN.md section 1, line by line: tests/naive_lzw.py) and the published Rust codec
   `zip2zip-compression` when it is installed, on the same 1024-token windows of pycode val, with
   equal outputs (asserted).
2. decoding: text bytes per second of KV-cached decoding, zip2zip (M=4) against the plain model
   (M=1) of the same size, replaying real validation text one code per step as generation would,
   at batch 1 and 8, and the aten ops one step dispatches (each a kernel launch on a GPU, which
   is launch-bound at batch 1). Untrained weights: the speed of a step does not depend on them,
   and the replayed codes are the text's own.
3. training: text bytes per optimizer step per second (forward, backward, AdamW), zip2zip with
   and without the canonical mask against plain, on train.py's batches (loader.build_batch;
   built apart, timed apart).
4. kernels: the Triton kernels against their PyTorch references (CUDA only).

    python bench.py                          # everything; a table on stdout
    python bench.py --json=bench.json        # the same figures as JSON too
    python bench.py --parts=codec,decode     # some of the parts
    python bench.py --quick=True             # a tiny model and few rounds, for the tests

Machines are noisy. The two sides of a comparison run alternately (A B A B ...) after one
warm-up round, and the table gives medians; a ratio is the median of the per-round ratios, so
a slowdown that hits both sides of a round cancels out.
"""

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from statistics import median

import numpy as np
import torch

import kernels
from fastgen import StaticStepper
from lib import cli
from tests.naive_lzw import naive_lzw_decode, naive_lzw_encode
from zip2zip import GPT, LZW, GPTConfig, Tokenizer, lzw_decode, lzw_encode

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class BenchConfig:
    parts: str = "codec,decode,train,kernels"   # which benchmarks to run, comma-separated
    quick: bool = False           # tiny model, few windows and rounds: seconds, for the tests
    rounds: int = 5               # timed rounds per comparison (after one warm-up round)
    json: str = ""                # also write the figures to this JSON file
    device: str = "auto"          # cpu, cuda; auto: cuda when there is one
    threads: int = 0              # torch CPU threads; 0: torch's default (1 is steadier on a busy machine)
    seed: int = 1337              # weights, windows and batches: the same run twice times the same work
    # codec
    max_subtokens: int = 4        # M of the zip2zip side: the paper's default
    max_codebook_size: int = 1024  # C: room for every entry a 1024-token window of code makes
    window: int = 1024            # base tokens per codec input, like a training window
    n_single: int = 200           # windows encoded one call at a time
    n_batch: int = 0              # windows in the batch encode; 0: every window of pycode val
    # models (the same architecture on both sides; nanoGPT's "baby GPT" size)
    n_layer: int = 6              # big enough that a step is the model's work, not Python's; small
                                  # enough to time on a CPU
    n_head: int = 6               # 64 dimensions per head, as GPT-2
    n_embd: int = 384             # baby GPT's width
    block_size: int = 512         # the plain model replays a full context without cropping
    decode_batches: str = "1,8"   # batch sizes of the decoding benchmark
    compile: bool = False         # decode with the compiled step (one CUDA graph a step on a GPU)
    train_batch_size: int = 4     # rows per training step (CPU-sized; raise it on a GPU)
    recon_max_entries: int = 256  # GPTConfig's default: the reconstruction loss is part of a zip2zip step


QUICK = dict(rounds=2, n_single=8, n_batch=32, n_layer=2, n_head=2, n_embd=64, block_size=32,
             train_batch_size=2, recon_max_entries=16)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def alternate(sides, rounds):
    """Call each side once per round, in turn (A B A B ...), after one untimed warm-up round.
    A side does its work and returns (amount of work, seconds): it times itself, so that it can
    leave its set-up out. Returns {side: [work per second, one per timed round]}."""
    rates = {name: [] for name in sides}
    for r in range(rounds + 1):
        for name, fn in sides.items():
            work, seconds = fn()
            if r > 0:
                rates[name].append(work / seconds)
    return rates


def clock(fn, *args, work, device="cpu"):
    """(work, seconds) of fn(*args): the form alternate() wants."""
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return work, time.perf_counter() - t0


def ratio(rates, a, b):
    """Median over rounds of side a's rate over side b's (each round pairs neighbours in time)."""
    return median([x / y for x, y in zip(rates[a], rates[b])])


def load_tokens(name, split):
    """Base ids of data/<name>/<split>.bin, preparing the data set first if it is missing."""
    folder = os.path.join(ROOT, "data", name)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        import importlib
        importlib.import_module(f"data.{name}.prepare").prepare()
    return np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")

# -----------------------------------------------------------------------------
# 1. codec


def unchecked_encode(ids, V, C, M, D):
    """lzw_encode without its input checks (a list of ints in range is taken on trust): what the
    checks cost is ours / unchecked."""
    lzw, out = LZW(V, C, M, D), []
    lzw.feed(ids, out)
    lzw.flush(out)
    return out


def bench_codec(cfg):
    V, C, M, D = 50257, cfg.max_codebook_size, cfg.max_subtokens, (50256,)
    ids = load_tokens("pycode", "val").tolist()
    windows = [ids[i:i + cfg.window] for i in range(0, len(ids) - cfg.window + 1, cfg.window)]
    single, batch = windows[:cfg.n_single], windows[:cfg.n_batch or len(windows)]
    codes = [lzw_encode(w, V, C, M, D) for w in single]
    n_single, n_batch = sum(map(len, single)), sum(map(len, batch))
    encoders = {"ours": lambda w: lzw_encode(w, V, C, M, D), "naive": lambda w: naive_lzw_encode(w, V, C, M, D),
                "unchecked": lambda w: unchecked_encode(w, V, C, M, D)}
    decoders = {"ours": lambda c: lzw_decode(c, V, C, M, D), "naive": lambda c: naive_lzw_decode(c, V, C, M, D)}
    batch_encoders = {"ours": lambda ws: [lzw_encode(w, V, C, M, D) for w in ws]}
    try:
        from zip2zip_compression import LZWCompressor
        # pad_token_id must lie outside the vocabulary: a pad id inside it changes the encoding
        rust = LZWCompressor(V, C, M, 10**6, list(D))
        encoders["rust"] = lambda w: rust.encode(w)[0]
        decoders["rust"] = lambda c: rust.decode(c)[0]
        batch_encoders["rust"] = lambda ws: rust.batch_encode(ws, False, False, None)[0]
    except ImportError:
        rust = None
    for name in encoders:   # the same outputs, or the speeds mean nothing
        assert [encoders[name](w) for w in single] == codes, f"{name} encoder differs from ours"
    for name in decoders:
        assert [decoders[name](c) for c in codes] == single, f"{name} decoder does not invert"
    for name in batch_encoders:
        assert batch_encoders[name](batch[:64]) == [lzw_encode(w, V, C, M, D) for w in batch[:64]], name

    def loop(f):
        return lambda xs: [f(x) for x in xs]

    result = {"windows": len(single), "batch_windows": len(batch), "window": cfg.window,
              "M": M, "C": C, "length_ratio": sum(map(len, codes)) / n_single}
    for what, impls, inputs, work in (("encode", {k: loop(f) for k, f in encoders.items()}, single, n_single),
                                      ("decode", {k: loop(f) for k, f in decoders.items()}, codes, n_single),
                                      ("batch_encode", batch_encoders, batch, n_batch)):
        rates = alternate({k: lambda f=f: clock(f, inputs, work=work) for k, f in impls.items()}, cfg.rounds)
        row = {f"{k}_tokens_per_s": median(v) for k, v in rates.items()}
        for other in ("naive", "rust", "unchecked"):
            if other in rates:
                row[f"ours_over_{other}"] = ratio(rates, "ours", other)
        if rust is None:
            row["rust_tokens_per_s"] = row["ours_over_rust"] = "not installed"
        result[what] = row
    return result

# -----------------------------------------------------------------------------
# 2. decoding


def make_models(cfg, device, unmasked=False):
    """zip2zip (M = cfg.max_subtokens) and plain (M=1) models of one architecture, untrained;
    with unmasked=True also zip2zip with canonical=False."""
    kinds = [("zip2zip", cfg.max_subtokens, True)] + [("unmasked", cfg.max_subtokens, False)] * unmasked + \
        [("plain", 1, True)]
    models = {}
    for name, M, canonical in kinds:
        torch.manual_seed(cfg.seed)
        models[name] = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     n_embd=cfg.n_embd, max_subtokens=M, max_codebook_size=cfg.max_codebook_size,
                                     recon_max_entries=cfg.recon_max_entries, canonical=canonical)).to(device)
        if str(device).startswith("cuda"):
            kernels.use_kernels(models[name])      # the fused embedding lookups, as train.py
    return models


def replay(model, rows, steps, compile=False):
    """Read rows[b][0] as the prompt, then feed rows[b][1..steps] one code per step, as generation
    does (each step also draws a next code). Returns the StaticStepper."""
    dec = StaticStepper(model, [r[:1] for r in rows], compile=compile)
    for s in range(1, steps + 1):
        dec.advance([r[s] for r in rows])
    return dec


def step_ops(dec, codes):
    """The aten ops one decoding step dispatches: [(op, is a view)]. A view launches nothing; every
    other op is at least one kernel launch on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append((func, func.is_view))
            return func(*args, **(kwargs or {}))

    ops = []
    with torch.no_grad(), Record():
        dec.advance(codes)
    return ops


def bench_decode(cfg, device, tok):
    """Text bytes per second of KV-cached decoding; both models replay the same text: B windows
    of block_size base tokens of pycode val (so the plain model never crops its context)."""
    val = load_tokens("pycode", "val")
    models = make_models(cfg, device)
    result = {}
    for B in [int(b) for b in cfg.decode_batches.split(",")]:
        starts = np.linspace(0, len(val) - cfg.block_size, B + 2).astype(int)[1:-1]
        texts = [val[s:s + cfg.block_size].tolist() for s in starts]
        sides, steps, n_bytes, ops = {}, {}, {}, {}
        for name, model in models.items():
            model.eval()
            c = model.config
            rows = [lzw_encode(t, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids) for t in texts]
            S = min(map(len, rows)) - 1               # steps every row can take
            base = [lzw_decode(r[:S + 1], c.vocab_size, c.max_codebook_size, c.max_subtokens,
                               c.disabled_ids) for r in rows]
            steps[name], n_bytes[name] = S, sum(tok.n_bytes(b[1:]) for b in base)   # the fed text
            half = replay(model, rows, S // 2)                 # a step in mid-text, eager, counted
            ops[name] = sum(not view for _, view in step_ops(half, [r[S // 2 + 1] for r in rows]))

            def run(model=model, rows=rows, name=name):
                with torch.no_grad():
                    t0 = time.perf_counter()
                    replay(model, rows, steps[name], cfg.compile)
                    sync(device)
                    return n_bytes[name], time.perf_counter() - t0
            sides[name] = run
        rates = alternate(sides, cfg.rounds)
        result[f"batch_{B}"] = {
            "zip2zip_bytes_per_s": median(rates["zip2zip"]), "plain_bytes_per_s": median(rates["plain"]),
            "ratio": ratio(rates, "zip2zip", "plain"), "zip2zip_ops": ops["zip2zip"], "plain_ops": ops["plain"],
            "ops_ratio": ops["zip2zip"] / ops["plain"],
            "zip2zip_steps": steps["zip2zip"], "plain_steps": steps["plain"],
            "text_bytes": n_bytes["plain"] // B}
    return result

# -----------------------------------------------------------------------------
# 3. training


def bench_train(cfg, device, tok):
    """Text bytes per second of one training step, and of building its batch, zip2zip vs plain."""
    from lib.loader import build_batch, to_device   # train.py's batches, moved as train.py moves them
    data = load_tokens("pycode", "train")
    models = make_models(cfg, device, unmasked=True)
    B, T = cfg.train_batch_size, cfg.block_size
    # every side reads the same windows in the same round (T + 1 codes cover at most M * (T + 1)
    # base ids): the masked and unmasked models see identical batches, so their ratio is the mask's
    rng = np.random.default_rng(cfg.seed)
    windows = [rng.integers(0, len(data) - cfg.max_subtokens * (T + 1), size=B) for _ in range(cfg.rounds + 1)]
    cuda = str(device).startswith("cuda")
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    build, sides = {name: [] for name in models}, {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(name=name, model=model, opt=opt, rounds=iter(windows)):
            # a fresh batch every step, built and moved to the device before the step's clock starts
            starts = next(rounds)
            t0 = time.perf_counter()
            x, y, hyper, n_bytes = build_batch(data, starts, T, model.config, tok.byte_lengths)
            x, y, hyper = to_device(x, y, hyper, device)
            sync(device)
            build[name].append(float(n_bytes) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            with autocast:
                _, loss = model(x, y, hyper)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            return float(n_bytes), time.perf_counter() - t0
        sides[name] = step
    rates = alternate(sides, cfg.rounds)
    return {"zip2zip_bytes_per_s": median(rates["zip2zip"]), "plain_bytes_per_s": median(rates["plain"]),
            "ratio": ratio(rates, "zip2zip", "plain"), "unmasked_bytes_per_s": median(rates["unmasked"]),
            "canonical_over_unmasked": ratio(rates, "zip2zip", "unmasked"), "batch_size": B, "block_size": T,
            "zip2zip_batch_build_bytes_per_s": median(build["zip2zip"][1:]),
            "plain_batch_build_bytes_per_s": median(build["plain"][1:])}

# -----------------------------------------------------------------------------
# 4. kernels


def bench_kernels(cfg, device, impls=("triton", "reference")):
    """Forward + backward of each dispatch function, the Triton kernel against its reference."""
    if not str(device).startswith("cuda") and impls[0] == "triton":
        return "skipped: no CUDA"
    g = torch.Generator().manual_seed(cfg.seed)
    V, d, K, M = 50257, cfg.n_embd, cfg.max_codebook_size, cfg.max_subtokens
    B, T, N = cfg.train_batch_size, cfg.block_size, cfg.max_codebook_size * cfg.train_batch_size
    wte = torch.randn(V, d, generator=g).to(device).requires_grad_()
    hyper = torch.randn(B, K, d, generator=g).to(device).requires_grad_()
    slot_pos = torch.randn(M, d, generator=g).to(device).requires_grad_()
    is_hyper = torch.rand(B, T, generator=g) < 0.5                       # half the positions, as on code
    idx = torch.where(is_hyper, V + torch.randint(0, K, (B, T), generator=g),
                      torch.randint(0, V, (B, T), generator=g)).to(device)
    contents = torch.randint(0, V, (N, M), generator=g).to(device)
    lengths = torch.randint(2, M + 1, (N,), generator=g).to(device)
    calls = {"hyper_embedding": lambda: kernels.hyper_embedding(idx, wte, hyper, V),
             "gather_slots": lambda: kernels.gather_slots(contents, lengths, wte, slot_pos)}

    def run(impl, call, n=10):
        kernels.FORCE = impl
        for _ in range(n):
            call().sum().backward()

    result, saved = {}, kernels.FORCE
    try:
        for what, call in calls.items():
            rates = alternate({impl: lambda impl=impl: clock(run, impl, call, work=10, device=device)
                               for impl in impls}, cfg.rounds)
            result[what] = {f"{impls[0]}_calls_per_s": median(rates[impls[0]]),
                            f"{impls[1]}_calls_per_s": median(rates[impls[1]]),
                            "speedup": ratio(rates, impls[0], impls[1])}
    finally:
        kernels.FORCE = saved
    return result

# -----------------------------------------------------------------------------
# the report


def fmt(x):
    """A rate as 1.23M / 45.6k / 7.8, or a note as it is."""
    if isinstance(x, str):
        return x
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


def fx(x):
    """A ratio as 1.23x, or a note as it is."""
    return x if isinstance(x, str) else f"{x:.2f}x"


def print_part(part, x, cfg):
    """The table of one part of the report (printed as soon as the part is done)."""
    if isinstance(x, str):                    # skipped, and why
        print(f"\n{part}: {x}", flush=True)
        return
    if part == "codec":
        print(f"\ncodec: base tokens/s on {x['window']}-token windows of pycode val (M={x['M']}, C={x['C']}; "
              f"codes/base tokens {x['length_ratio']:.3f})")
        rows = [["", "ours", "naive", "rust", "ours/naive", "ours/rust", "target"]]
        for what, label, target in (("encode", f"encode, {x['windows']} x 1", ">= 0.6x rust"),
                                    ("batch_encode", f"encode, batch of {x['batch_windows']}", ">= 1x rust"),
                                    ("decode", f"decode, {x['windows']} x 1", "")):
            row = x[what]
            rows.append([label, fmt(row["ours_tokens_per_s"]), fmt(row.get("naive_tokens_per_s", "-")),
                         fmt(row["rust_tokens_per_s"]), fx(row.get("ours_over_naive", "-")),
                         fx(row["ours_over_rust"]), target])
        print("\n".join(cli.table(rows)))
        print(f"the input checks of lzw_encode (ids are integers in range): ours / unchecked = "
              f"{fx(x['encode']['ours_over_unchecked'])} of the encoding speed")
    elif part == "decode":
        print(f"\ndecoding: text bytes/s with the KV cache, replaying pycode val ({cfg.n_layer} layers, "
              f"{cfg.n_embd} wide, context {cfg.block_size}{', compiled step' if cfg.compile else ''}); target: "
              f">= 1.6x at batch 1; ops of a step (non-view aten ops, eager): zip2zip <= 1.4x plain")
        rows = [["batch", "zip2zip", "plain", "ratio", "steps zip/plain", "ops/step zip/plain", "ops ratio"]]
        for key, row in x.items():
            rows.append([key.removeprefix("batch_"), fmt(row["zip2zip_bytes_per_s"]), fmt(row["plain_bytes_per_s"]),
                         fx(row["ratio"]), f"{row['zip2zip_steps']}/{row['plain_steps']}",
                         f"{row['zip2zip_ops']}/{row['plain_ops']}", fx(row["ops_ratio"])])
        print("\n".join(cli.table(rows)))
    elif part == "train":
        print(f"\ntraining: text bytes/s of one step (forward, backward, AdamW), batch {x['batch_size']} x "
              f"{x['block_size']} codes; building the batch is timed apart. zip2zip masks its output to "
              f"canonical codes, unmasked does not (target: the mask costs <= 5%)")
        print("\n".join(cli.table([
            ["", "zip2zip", "unmasked", "plain", "zip2zip/plain", "zip2zip/unmasked"],
            ["step", fmt(x["zip2zip_bytes_per_s"]), fmt(x["unmasked_bytes_per_s"]), fmt(x["plain_bytes_per_s"]),
             fx(x["ratio"]), fx(x["canonical_over_unmasked"])],
            ["build batch", fmt(x["zip2zip_batch_build_bytes_per_s"]), "", fmt(x["plain_batch_build_bytes_per_s"]),
             "", ""]])))
    elif part == "kernels":
        print("\nkernels: forward + backward calls/s")
        print("\n".join(cli.table([[what] + [f"{key} {fx(v) if key == 'speedup' else fmt(v)}" for key, v in row.items()]
                                   for what, row in x.items()])))
    sys.stdout.flush()


def check_filled(x, where="bench"):
    """Every figure is a finite number or a string saying why it is missing."""
    if isinstance(x, dict):
        for key, v in x.items():
            check_filled(v, f"{where}.{key}")
    elif x is None or (isinstance(x, float) and not math.isfinite(x)):
        raise AssertionError(f"{where} is {x}")


def setup(argv):
    """(settings, parts, device, tokenizer) from the command line, every one checked; the data
    sets the parts read are prepared first if missing."""
    cfg = BenchConfig()
    cli.configure(cfg, argv, presets=False, positional=False)
    parts = [p for p in cfg.parts.split(",") if p]
    unknown = set(parts) - {"codec", "decode", "train", "kernels"}
    if unknown:
        raise ValueError(f"--parts={cfg.parts}: unknown parts {sorted(unknown)}; known: codec, decode, train, kernels")
    if cfg.quick:   # the tiny settings, unless given on the command line
        given = {a[2:].partition("=")[0] for a in argv}
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
    batches = cfg.decode_batches.split(",")
    cli.check(cfg, ("rounds", cfg.rounds >= 1, "1 or more"), ("threads", cfg.threads >= 0, "0 (torch's default) or more"),
              ("max_subtokens", cfg.max_subtokens >= 1, "1 or more"), ("window", cfg.window >= 1, "1 or more"),
              ("n_single", cfg.n_single >= 1, "1 or more"), ("n_batch", cfg.n_batch >= 0, "0 (all) or more"),
              ("decode_batches", all(b.isdigit() and int(b) > 0 for b in batches), "batch sizes like 1,8"),
              ("train_batch_size", cfg.train_batch_size >= 1, "1 or more"),
              ("json", not cfg.json or os.path.isdir(os.path.dirname(os.path.abspath(cfg.json))),
               "a file in a folder that exists"))
    # the model's settings, checked by its own config now, not deep inside a part later
    GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
              max_subtokens=cfg.max_subtokens, max_codebook_size=cfg.max_codebook_size,
              recon_max_entries=cfg.recon_max_entries)
    device = cli.device(cfg.device)
    tok = Tokenizer(cfg.max_subtokens, cfg.max_codebook_size)   # GPT-2's ranks, checked here
    if set(parts) - {"kernels"}:   # the other parts read pycode: prepare it now if it is missing
        load_tokens("pycode", "val")
    return cfg, parts, device, tok


def main(argv=None):
    with cli.one_line_errors():
        cfg, parts, device, tok = setup(sys.argv[1:] if argv is None else list(argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = {"config": asdict(cfg), "machine": {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count()}}
    benches = {"codec": lambda: bench_codec(cfg), "decode": lambda: bench_decode(cfg, device, tok),
               "train": lambda: bench_train(cfg, device, tok), "kernels": lambda: bench_kernels(cfg, device)}
    m = report["machine"]
    print(f"zip2zip bench: {m['device']}, torch {m['torch']}, {m['threads']} threads; "
          f"medians of {cfg.rounds} alternating rounds", flush=True)
    report["seconds"] = {}
    for part in parts:
        t0 = time.perf_counter()
        report[part] = benches[part]()
        report["seconds"][part] = time.perf_counter() - t0
        print_part(part, report[part], cfg)
    check_filled(report)
    print("\n(" + ", ".join(f"{part} {s:.0f} s" for part, s in report["seconds"].items()) + ")")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
