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
3. prefill: text bytes per second from a prompt's text to the first new code's logits (the
   tokenizer, LZW, the hyper-encoder over the prompt's entries, the forward pass that fills the
   KV cache, the first step), zip2zip against plain on the same text, at batch 1 and 8, for
   prompts of a quarter and of all of the plain model's context.
4. memory: the KV cache's bytes per byte of text, read off the cache tensors once a full context
   is read, and how much text one full context holds, on code and prose.
5. end to end: text in, text out at batch 1: a prompt's text to a fixed number of bytes of new
   text (tokenizer, LZW both ways, prefill, decoding), zip2zip against plain.
6. training: text bytes per optimizer step per second (forward, backward, AdamW), zip2zip with
   and without the canonical mask against plain, on train.py's batches (loader.build_batch;
   built apart, timed apart).
7. kernels: the Triton kernels against their PyTorch references (CUDA only).

    python bench.py                          # everything; a table on stdout
    python bench.py --json=bench.json        # the same figures as JSON too
    python bench.py --parts=codec,decode     # some of the parts
    python bench.py --quick=True             # a tiny model and few rounds, for the tests

Machines are noisy. The two sides of a comparison run alternately (A B A B ...) after one
warm-up round, and the table gives medians; a ratio is the median of the per-round ratios, so
a slowdown that hits both sides of a round cancels out, and its spread is the lowest and highest
of them. Each part runs in a fresh process, as a user's script would: in one process the
training figure moved with the parts before it (1.23x-1.42x after decoding, 1.53x-1.59x alone).
The targets apply to the full run; --quick checks the plumbing on toy sizes and carries none.
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
    parts: str = "codec,decode,prefill,memory,e2e,train,kernels"   # which benchmarks to run, comma-separated
    quick: bool = False           # tiny model, few windows and rounds: seconds, for the tests (no targets)
    fresh: bool = True            # each part in a fresh process, so that no part's figures depend on
                                  # what ran before it (False: all in this one, as the tests do)
    rounds: int = 5               # timed rounds per comparison (after one warm-up round)
    json: str = ""                # also write the figures to this JSON file
    device: str = "auto"          # cpu, cuda; auto: cuda when there is one
    threads: int = 0              # torch CPU threads; 0: torch's default (1 is steadier on a busy machine)
    seed: int = 1337              # weights, windows and batches: the same run twice times the same work
    # codec
    max_subtokens: int = 4        # M of the zip2zip side: the paper's default
    max_codebook_size: int = 1024  # C: room for every entry a 1024-token window of code makes
    window: int = 1024            # base tokens per codec input, like a training window
    n_single: int = 20            # windows per round, encoded one call at a time
    codec_rounds: int = 100       # rounds of those: many short ones, which keep the ratio steady
    n_batch: int = 0              # windows in the batch encode; 0: every window of pycode val
    # models (the same architecture on both sides; nanoGPT's "baby GPT" size)
    n_layer: int = 6              # big enough that a step is the model's work, not Python's; small
                                  # enough to time on a CPU
    n_head: int = 6               # 64 dimensions per head, as GPT-2
    n_embd: int = 384             # baby GPT's width
    block_size: int = 512         # the plain model replays a full context without cropping
    decode_batches: str = "1,8"   # batch sizes of the prefill and decoding benchmarks
    e2e_bytes: int = 256          # bytes of new text the end-to-end run writes after its prompt
    compile: bool = False         # decode with the compiled step (one CUDA graph a step on a GPU)
    train_batch_size: int = 4     # rows per training step (CPU-sized; raise it on a GPU)
    recon_max_entries: int = 256  # GPTConfig's default: the reconstruction loss is part of a zip2zip step


QUICK = dict(rounds=2, n_single=8, codec_rounds=3, n_batch=32, n_layer=2, n_head=2, n_embd=64, block_size=32,
             train_batch_size=2, recon_max_entries=16, e2e_bytes=16)
PARTS = ("codec", "decode", "prefill", "memory", "e2e", "train", "kernels")


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


def spread(rates, a, b, q=0.0):
    """[lowest, highest] of the per-round ratios that ratio(rates, a, b) takes the median of; with
    q > 0 their q and 1 - q quantiles instead (q = 0.25: the quartiles)."""
    r = sorted(x / y for x, y in zip(rates[a], rates[b]))
    at = lambda p: r[round(p * (len(r) - 1))]
    return [at(q), at(1 - q)]


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
    """Base tokens per second of each codec on the same windows, with equal outputs (asserted).
    One window per call: codec_rounds short rounds of n_single windows each, the rounds walking
    through all of pycode val; short rounds are what keeps the ratio steady on a busy machine (a
    round that a time slice of another process lands in is an outlier, which the median drops:
    with 5 rounds of 200 windows the ratio to Rust moved from 0.55x to 0.68x between runs, with
    100 rounds of 20 by a third of that). The batch encode: rounds of every window."""
    V, C, M, D = 50257, cfg.max_codebook_size, cfg.max_subtokens, (50256,)
    ids = load_tokens("pycode", "val").tolist()
    windows = [ids[i:i + cfg.window] for i in range(0, len(ids) - cfg.window + 1, cfg.window)]
    batch = windows[:cfg.n_batch or len(windows)]
    chunks = [windows[i:i + cfg.n_single] for i in range(0, len(windows) - cfg.n_single + 1, cfg.n_single)]
    codes = [[lzw_encode(w, V, C, M, D) for w in chunk] for chunk in chunks]
    single = [w for chunk in chunks[:cfg.codec_rounds + 1] for w in chunk]   # what the rounds read
    n_single, n_batch = sum(map(len, chunks[0])), sum(map(len, batch))
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
    flat = [c for chunk in codes[:cfg.codec_rounds + 1] for c in chunk]
    for name in encoders:   # the same outputs, or the speeds mean nothing
        assert [encoders[name](w) for w in single] == flat, f"{name} encoder differs from ours"
    for name in decoders:
        assert [decoders[name](c) for c in flat] == single, f"{name} decoder does not invert"
    for name in batch_encoders:
        assert batch_encoders[name](batch[:64]) == [lzw_encode(w, V, C, M, D) for w in batch[:64]], name

    def loop(f):
        return lambda xs: [f(x) for x in xs]

    def rounds(inputs):   # a side's inputs round by round, the same for every side
        it = iter(inputs * (cfg.codec_rounds // len(inputs) + 1))
        return lambda: next(it)

    result = {"windows": cfg.n_single, "rounds": cfg.codec_rounds, "batch_windows": len(batch), "window": cfg.window,
              "M": M, "C": C, "length_ratio": sum(map(len, flat)) / sum(map(len, single))}
    for what, impls, inputs, work, n_rounds in (
            ("encode", {k: loop(f) for k, f in encoders.items()}, chunks, n_single, cfg.codec_rounds),
            ("decode", {k: loop(f) for k, f in decoders.items()}, codes, n_single, cfg.codec_rounds),
            ("batch_encode", batch_encoders, [batch], n_batch, cfg.rounds)):
        rates = alternate({k: lambda f=f, next_input=rounds(inputs): clock(f, next_input(), work=work)
                           for k, f in impls.items()}, n_rounds)
        row = {f"{k}_tokens_per_s": median(v) for k, v in rates.items()}
        for other in ("naive", "rust", "unchecked"):
            if other in rates:
                row[f"ours_over_{other}"] = ratio(rates, "ours", other)
                # the quartiles of many short rounds (their extremes are the outliers the median drops)
                row[f"ours_over_{other}_spread"] = spread(rates, "ours", other, 0.25 if what != "batch_encode" else 0)
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
        # Text per step, zip2zip over plain, is the ratio's ceiling (a zip2zip step as cheap as a
        # plain one); that over the ratio is what a zip2zip step costs, in plain steps. (At batch
        # B every row takes the shortest row's steps: its text per step, not the window's.)
        limit = (n_bytes["zip2zip"] / steps["zip2zip"]) / (n_bytes["plain"] / steps["plain"])
        result[f"batch_{B}"] = {
            "zip2zip_bytes_per_s": median(rates["zip2zip"]), "plain_bytes_per_s": median(rates["plain"]),
            "ratio": ratio(rates, "zip2zip", "plain"), "ratio_spread": spread(rates, "zip2zip", "plain"),
            "limit": limit, "step_cost": limit / ratio(rates, "zip2zip", "plain"),
            "zip2zip_ops": ops["zip2zip"], "plain_ops": ops["plain"], "ops_ratio": ops["zip2zip"] / ops["plain"],
            "zip2zip_steps": steps["zip2zip"], "plain_steps": steps["plain"],
            "text_bytes": n_bytes["plain"] // B}
    return result

# -----------------------------------------------------------------------------
# 3. prefill


class ClockedStepper(StaticStepper):
    """fastgen.StaticStepper that clocks how it reads its prompts, phase by phase, into `seconds`:
    the hyper-encoder over the prompts' entries, the forward pass that fills the KV cache, and the
    first step (the first new code's logits). The rest of its set-up is the cache's allocation and
    the host's LZW decoders reading the prompts' codes."""

    def __init__(self, *args, **kwargs):
        self.seconds = {"hyper-encoder": 0.0, "forward": 0.0, "first step": 0.0}
        super().__init__(*args, **kwargs)

    def _clocked(self, phase, method, *args):
        sync(self.model.device)
        t0 = time.perf_counter()
        method(*args)
        sync(self.model.device)
        self.seconds[phase] += time.perf_counter() - t0

    def _install(self, new):
        self._clocked("hyper-encoder", super()._install, new)

    def _refill(self, rows, codes):
        self._clocked("forward", super()._refill, rows, codes)

    def _run(self, parts):
        self._clocked("first step", super()._run, parts)


def prefill(model, tok, texts, compile=False):
    """What a reader waits for before the first new code: each prompt's text after an
    <|endoftext|> (as sample.py reads it) cut into base tokens, compressed (zip2zip), read into the
    KV cache, and the first new code's logits. Returns the ClockedStepper, whose `seconds` then
    holds every phase and the total, and `prompt_ids` each prompt's number of base ids."""
    c, device = model.config, model.device
    t0 = time.perf_counter()
    rows = [[tok.eot] + tok.encode_base(text) for text in texts]
    n_ids = [len(ids) for ids in rows]
    t1 = time.perf_counter()
    if c.has_hypertokens:   # tiktoken's ids need none of lzw_encode's checks (Tokenizer.encode)
        for b, ids in enumerate(rows):
            lzw, rows[b] = LZW(c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids), []
            lzw.feed(ids, rows[b])
            lzw.flush(rows[b])
    t2 = time.perf_counter()
    dec = ClockedStepper(model, rows, compile=compile)
    sync(device)
    t3 = time.perf_counter()
    dec.seconds.update({"tokenizer": t1 - t0, "LZW encode": t2 - t1,
                        "set-up": t3 - t2 - sum(dec.seconds.values()), "total": t3 - t0})
    dec.prompt_ids = n_ids   # base ids of each prompt, its <|endoftext|> included
    return dec


def prompt_texts(tok, ids, n, B):
    """B texts spread over base ids `ids` whose tokens, after an <|endoftext|>, number at most n
    (a window of n - 1 base ids as text: tokenized again, it may come out a token longer)."""
    texts = []
    for s in np.linspace(0, len(ids) - n, B + 2).astype(int)[1:-1]:
        k = n - 1
        while len(tok.encode_base(text := tok.decode_base(ids[s:s + k].tolist()))) > n - 1:
            k -= 1
        texts.append(text)
    return texts


PHASES = ("tokenizer", "LZW encode", "set-up", "hyper-encoder", "forward", "first step")


def bench_prefill(cfg, device, tok):
    """Text bytes per second from prompt texts to the first new code's logits, zip2zip against
    plain on the same texts: prompts of a quarter and of all of the plain model's context (the
    zip2zip model reads them in about half as many codes), at each batch size; and where the time
    goes, phase by phase (medians over the timed rounds, ms)."""
    val = load_tokens("pycode", "val")
    models = make_models(cfg, device)
    for model in models.values():
        model.eval()
    result = {}
    for B in [int(b) for b in cfg.decode_batches.split(",")]:
        for fill, n in (("quarter", cfg.block_size // 4), ("full", cfg.block_size)):
            texts = prompt_texts(tok, val, n, B)
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            phases, positions = {name: [] for name in models}, {}

            def run(name):
                t0 = time.perf_counter()
                dec = prefill(models[name], tok, texts, cfg.compile)
                seconds = time.perf_counter() - t0
                phases[name].append(dec.seconds)
                positions[name] = (sum(map(len, dec.rows)), B * max(map(len, dec.rows)))   # (codes, padded)
                return n_bytes, seconds
            rates = alternate({name: lambda name=name: run(name) for name in models}, cfg.rounds)
            result[f"batch_{B}_{fill}"] = {
                "zip2zip_bytes_per_s": median(rates["zip2zip"]), "plain_bytes_per_s": median(rates["plain"]),
                "ratio": ratio(rates, "zip2zip", "plain"), "ratio_spread": spread(rates, "zip2zip", "plain"),
                # the ratio's ceiling if a code cost what a token costs: tokens per code; and the
                # forward pass's, which pads every row to the longest
                "limit": positions["plain"][0] / positions["zip2zip"][0],
                "limit_padded": positions["plain"][1] / positions["zip2zip"][1],
                "zip2zip_codes": positions["zip2zip"][0] // B, "plain_tokens": positions["plain"][0] // B,
                "text_bytes": n_bytes // B,
                **{f"{name}_ms": {p: 1e3 * median(s[p] for s in phases[name][1:]) for p in PHASES + ("total",)
                                  if name == "zip2zip" or p not in ("LZW encode", "hyper-encoder")}
                   for name in models}}
    return result

# -----------------------------------------------------------------------------
# 4. memory


def cache_bytes(dec):
    """Bytes of each row's KV cache that hold keys or values, counted on the cache tensors
    themselves: the elements written so far (the cache starts as zeros, and a key or value is
    never exactly 0). Rows read together are padded to the longest, and a pad's slots count too;
    bench_memory reads rows of one length, a full context each: every slot."""
    layers = dec.state["k"] + dec.state["v"]                    # one (B, nh, block_size, hs) tensor a layer each
    return [sum(int((t[b] != 0).sum()) for t in layers) * layers[0].element_size() for b in range(layers[0].size(0))]


def table_bytes(dec):
    """Bytes of one row's state that zip2zip adds beside the KV cache: its tables of hyper-
    embeddings (one when tied) and trie facts, allocated for the whole codebook. 0 for plain."""
    tables = {id(t): t for key, t in dec.state.items() if key in ("table_in", "table_out", "trie")}
    return sum(t.nbytes for t in tables.values()) // len(dec.rows)


def data_sets():
    """{name: base ids}: code is pycode val; prose all of prose (val + train: it is small)."""
    return {"code": np.asarray(load_tokens("pycode", "val")),
            "prose": np.concatenate([load_tokens("prose", s) for s in ("val", "train")])}


def bench_memory(cfg, device, tok, windows=8):
    """Bytes of decoding state per byte of text once a full context is read, zip2zip against
    plain: `windows` windows of each data set, each model reading a whole context of its own
    codes (block_size of them) from each window's start. The text a full context holds is what
    those codes spell (the mean over windows). Not timed: the spread is over windows."""
    models = make_models(cfg, device)
    result = {}
    for data, ids in data_sets().items():
        n = cfg.max_subtokens * cfg.block_size   # base ids enough for block_size codes (a code spells <= M)
        if len(ids) < n:
            raise ValueError(f"{data}: {len(ids):,} base tokens, fewer than the {n:,} a window needs")
        starts = np.linspace(0, len(ids) - n, windows).astype(int)
        held, kv, tables = {}, {}, {}
        for name, model in models.items():
            c = model.config
            args = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
            rows = [lzw_encode(ids[s:s + n], *args)[:c.block_size] for s in starts]        # a full context each
            with torch.no_grad():
                dec = StaticStepper(model.eval(), rows)
            held[name] = [tok.n_bytes(lzw_decode(r, *args)) for r in rows]
            kv[name], tables[name] = cache_bytes(dec), table_bytes(dec)
        per_window = [z / p for z, p in zip(held["zip2zip"], held["plain"])]
        kv_per_byte = {name: sum(kv[name]) / sum(held[name]) for name in models}
        result[data] = {   # the text of all windows together, and the lowest and highest window's ratio
            "zip2zip_text_bytes": sum(held["zip2zip"]) / windows, "plain_text_bytes": sum(held["plain"]) / windows,
            "text_ratio": sum(held["zip2zip"]) / sum(held["plain"]),
            "text_ratio_spread": [min(per_window), max(per_window)],
            "zip2zip_kv_bytes_per_text_byte": kv_per_byte["zip2zip"],
            "plain_kv_bytes_per_text_byte": kv_per_byte["plain"],
            "kv_ratio": kv_per_byte["zip2zip"] / kv_per_byte["plain"],
            "zip2zip_kv_bytes": median(kv["zip2zip"]), "plain_kv_bytes": median(kv["plain"]),
            "zip2zip_table_bytes": tables["zip2zip"],
            "zip2zip_state_bytes_per_text_byte": (sum(kv["zip2zip"]) + windows * tables["zip2zip"]) /
            sum(held["zip2zip"]),
            "windows": windows, "block_size": cfg.block_size}
    return result

# -----------------------------------------------------------------------------
# 5. end to end


def write_text(model, tok, prompt, codes, compile=False):
    """Text in, text out, one row: `prompt` (text) read as prefill() reads it, then the codes
    `codes` replayed one per step as if drawn, and the text they spell (LZW decoding with the
    codebook the prompt and they built, then BPE). Returns (the new text, {phase: seconds})."""
    c, device, t0 = model.config, model.device, time.perf_counter()
    dec = prefill(model, tok, [prompt], compile)
    t1 = time.perf_counter()
    for code in codes:
        dec.advance([code])
    sync(device)
    t2 = time.perf_counter()
    row = dec.rows[0]   # the prompt's codes and the new ones, decoded as sample.py does
    base = lzw_decode(row, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids) \
        if c.has_hypertokens else row
    text = tok.decode_base(base[dec.prompt_ids[0]:])
    return text, {"prompt": t1 - t0, "steps": t2 - t1, "text out": time.perf_counter() - t2}


def e2e_text(tok, ids, config, n_bytes):
    """Base ids `ids` (a context of text) cut into a prompt and what follows it. The prompt is the
    first whole codes (of the zip2zip model, `config`) that cover a quarter of the ids and whose
    text tokenizes back to them, so that both models read the window's own codes. Returns (prompt
    text, {"zip2zip": the codes, "plain": the base ids, that spell the first n_bytes of text after
    it}, {the same: the base ids they spell}), or ValueError if the window holds too little text."""
    c = config
    lzw, codes = LZW(c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids), []
    lzw.feed(ids, codes)
    lzw.flush(codes)
    lzw = LZW(c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
    spans = np.cumsum([0] + [len(lzw.push(code)) for code in codes]).tolist()   # ids before each code
    for P in range(1, len(codes)):
        k = spans[P]
        if k >= len(ids) // 4 and tok.encode_base(prompt := tok.decode_base(ids[:k])) == ids[:k]:
            break
    else:
        raise ValueError("e2e: no prompt in the window tokenizes back to its own base ids")

    def enough(ends):   # the fewest pieces after the prompt (ending at ids[:ends[i]]) for n_bytes of text
        n = next((i for i, e in enumerate(ends) if tok.n_bytes(ids[k:e]) >= n_bytes), None)
        if n is None:
            raise ValueError(f"--e2e_bytes={n_bytes}: more text than the context holds after its prompt "
                             f"({tok.n_bytes(ids[k:ends[-1]])} bytes)")
        return n + 1
    G = enough(spans[P + 1:])
    G_plain = enough(range(k + 1, len(ids)))    # the plain model's context holds an <|endoftext|> too
    return prompt, {"zip2zip": codes[P:P + G], "plain": ids[k:k + G_plain]}, \
        {"zip2zip": ids[k:spans[P + G]], "plain": ids[k:k + G_plain]}


def bench_e2e(cfg, device, tok):
    """Text bytes per second, text in and text out, batch 1: a prompt of pycode val (a quarter of
    the plain model's context, in the window of the batch-1 decoding) to e2e_bytes of new text,
    each model writing the text that follows the prompt in val, in its own codes, replayed one per
    step. Where the time goes: the prompt (prefill), the steps, the text out (ms, medians)."""
    val = load_tokens("pycode", "val")
    models = make_models(cfg, device)
    s = np.linspace(0, len(val) - cfg.block_size, 3).astype(int)[1]
    prompt, new, spelled = e2e_text(tok, val[s:s + cfg.block_size].tolist(), models["zip2zip"].config,
                                    cfg.e2e_bytes)
    phases, sides = {name: [] for name in models}, {}
    for name, model in models.items():
        model.eval()
        want, n_bytes = tok.decode_base(spelled[name]), tok.n_bytes(spelled[name])

        def run(model=model, name=name, want=want, n_bytes=n_bytes):
            t0 = time.perf_counter()
            text, seconds = write_text(model, tok, prompt, new[name], cfg.compile)
            t1 = time.perf_counter()
            assert text == want, f"{name} wrote other text than it replayed"
            phases[name].append(seconds)
            return n_bytes, t1 - t0
        sides[name] = run
    rates = alternate(sides, cfg.rounds)
    return {"zip2zip_bytes_per_s": median(rates["zip2zip"]), "plain_bytes_per_s": median(rates["plain"]),
            "ratio": ratio(rates, "zip2zip", "plain"), "ratio_spread": spread(rates, "zip2zip", "plain"),
            "prompt_bytes": len(prompt.encode("utf-8")),
            "zip2zip_text_bytes": tok.n_bytes(spelled["zip2zip"]), "plain_text_bytes": tok.n_bytes(spelled["plain"]),
            "zip2zip_steps": len(new["zip2zip"]), "plain_steps": len(new["plain"]),
            **{f"{name}_ms": {p: 1e3 * median(s[p] for s in phases[name][1:]) for p in ("prompt", "steps", "text out")}
               for name in models}}

# -----------------------------------------------------------------------------
# 6. training


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
            "ratio": ratio(rates, "zip2zip", "plain"), "ratio_spread": spread(rates, "zip2zip", "plain"),
            "unmasked_bytes_per_s": median(rates["unmasked"]),
            "canonical_over_unmasked": ratio(rates, "zip2zip", "unmasked"),
            "canonical_over_unmasked_spread": spread(rates, "zip2zip", "unmasked"), "batch_size": B, "block_size": T,
            "zip2zip_batch_build_bytes_per_s": median(build["zip2zip"][1:]),
            "plain_batch_build_bytes_per_s": median(build["plain"][1:])}

# -----------------------------------------------------------------------------
# 7. kernels


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
                            "speedup": ratio(rates, impls[0], impls[1]),
                            "speedup_spread": spread(rates, impls[0], impls[1])}
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


def fxs(row, key="ratio"):
    """A ratio with its spread over rounds: 1.23x (1.20-1.31)."""
    lo, hi = row[f"{key}_spread"]
    return f"{row[key]:.2f}x ({lo:.2f}-{hi:.2f})"


def print_part(part, x, cfg):
    """The table of one part of the report (printed as soon as the part is done). The targets are
    the full run's: a quick run's toy sizes carry none."""
    if isinstance(x, str):                    # skipped, and why
        print(f"\n{part}: {x}", flush=True)
        return
    target = (lambda t: []) if cfg.quick else (lambda t: [t])    # a table's last column, or none
    model = f"{cfg.n_layer} layers, {cfg.n_embd} wide, context {cfg.block_size}"
    if part == "codec":
        print(f"\ncodec: base tokens/s on {x['window']}-token windows of pycode val (M={x['M']}, C={x['C']}; "
              f"codes/base tokens {x['length_ratio']:.3f}); one window a call: {x['rounds']} rounds of {x['windows']} "
              f"windows, ours/rust the median (quartiles); a batch: {cfg.rounds} rounds, (lowest-highest)")
        rows = [["", "ours", "naive", "rust", "ours/naive", "ours/rust"] + target("target")]
        for what, label, goal in (("encode", "encode, 1 a call", ">= 0.6x rust"),
                                  ("batch_encode", f"encode, batch of {x['batch_windows']}", ">= 1x rust"),
                                  ("decode", "decode, 1 a call", "")):
            row = x[what]
            rows.append([label, fmt(row["ours_tokens_per_s"]), fmt(row.get("naive_tokens_per_s", "-")),
                         fmt(row["rust_tokens_per_s"]), fx(row.get("ours_over_naive", "-")),
                         fxs(row, "ours_over_rust") if "ours_over_rust_spread" in row else fx(row["ours_over_rust"])]
                        + target(goal))
        print("\n".join(cli.table(rows)))
        print(f"the input checks of lzw_encode (ids are integers in range): ours / unchecked = "
              f"{fx(x['encode']['ours_over_unchecked'])} of the encoding speed")
    elif part == "decode":
        print(f"\ndecoding: text bytes/s with the KV cache, replaying pycode val ({model}"
              f"{', compiled step' if cfg.compile else ''}); ratio: median (lowest-highest) over rounds; limit: "
              f"text per step, zip2zip/plain; step cost: limit/ratio, a zip2zip step in plain steps; ops of a step: "
              f"non-view aten ops, eager")
        rows = [["batch", "zip2zip", "plain", "ratio", "limit", "step cost", "steps zip/plain", "ops/step zip/plain",
                 "ops ratio"] + target("target")]
        for key, row in x.items():
            B = key.removeprefix("batch_")
            rows.append([B, fmt(row["zip2zip_bytes_per_s"]), fmt(row["plain_bytes_per_s"]), fxs(row), fx(row["limit"]),
                         fx(row["step_cost"]), f"{row['zip2zip_steps']}/{row['plain_steps']}",
                         f"{row['zip2zip_ops']}/{row['plain_ops']}", fx(row["ops_ratio"])]
                        + target({"1": ">= 1.6x; ops <= 1.4x", "8": ">= 1.9x; ops <= 1.4x"}.get(B, "ops <= 1.4x")))
        print("\n".join(cli.table(rows)))
    elif part == "prefill":
        print(f"\nprefill: text bytes/s from prompt texts of pycode val to the first new code's logits ({model}"
              f"{', compiled step' if cfg.compile else ''}), the same texts on both sides: a quarter and all of the "
              f"plain model's context; limit: tokens per code, and padded: the rows padded to the longest")
        rows = [["batch", "prompt", "bytes/row", "codes/tokens", "zip2zip", "plain", "ratio", "limit", "padded"]
                + target("target")]
        for key, row in x.items():
            B, fill = key.removeprefix("batch_").split("_")
            rows.append([B, fill, str(row["text_bytes"]), f"{row['zip2zip_codes']}/{row['plain_tokens']}",
                         fmt(row["zip2zip_bytes_per_s"]), fmt(row["plain_bytes_per_s"]), fxs(row), fx(row["limit"]),
                         fx(row["limit_padded"])] + target(">= 1.8x" if B == "1" else ""))
        print("\n".join(cli.table(rows)))
        print("where the time goes, ms (medians over rounds):")
        rows = [["batch", "prompt", "model"] + list(PHASES) + ["total"]]
        for key, row in x.items():
            for name in ("zip2zip", "plain"):
                ms = row[f"{name}_ms"]
                rows.append(key.removeprefix("batch_").split("_") + [name] +
                            [f"{ms[p]:.1f}" if p in ms else "-" for p in PHASES + ("total",)])
        print("\n".join(cli.table(rows)))
    elif part == "memory":
        print(f"\nmemory: decoding state once a full context ({cfg.block_size} codes) is read, {x['code']['windows']} "
              f"windows per data set, read off the tensors; zip2zip also keeps a table of its codebook's "
              f"hyper-embeddings per row ({fmt(x['code']['zip2zip_table_bytes'])}B)")
        rows = [["data", "text/context zip2zip", "plain", "ratio", "KV B/text B zip2zip", "plain", "ratio",
                 "with tables"]]
        for data, row in x.items():
            rows.append([data, f"{row['zip2zip_text_bytes']:,.0f} B", f"{row['plain_text_bytes']:,.0f} B",
                         fxs(row, "text_ratio"), f"{row['zip2zip_kv_bytes_per_text_byte']:,.0f}",
                         f"{row['plain_kv_bytes_per_text_byte']:,.0f}", fx(row["kv_ratio"]),
                         f"{row['zip2zip_state_bytes_per_text_byte']:,.0f}"])
        print("\n".join(cli.table(rows)))
    elif part == "e2e":
        print(f"\nend to end: text bytes/s, text in and text out at batch 1 ({model}): a {x['prompt_bytes']}-byte "
              f"prompt of pycode val, then about {cfg.e2e_bytes} bytes of new text (its own, replayed)")
        rows = [["", "zip2zip", "plain", "ratio", "steps zip/plain", "new bytes"]]
        rows.append(["text/s", fmt(x["zip2zip_bytes_per_s"]), fmt(x["plain_bytes_per_s"]), fxs(x),
                     f"{x['zip2zip_steps']}/{x['plain_steps']}", f"{x['zip2zip_text_bytes']}/{x['plain_text_bytes']}"])
        for p in ("prompt", "steps", "text out"):
            rows.append([f"{p}, ms", f"{x['zip2zip_ms'][p]:.1f}", f"{x['plain_ms'][p]:.1f}", "", "", ""])
        print("\n".join(cli.table(rows)))
    elif part == "train":
        print(f"\ntraining: text bytes/s of one step (forward, backward, AdamW), batch {x['batch_size']} x "
              f"{x['block_size']} codes; building the batch is timed apart. zip2zip masks its output to "
              f"canonical codes, unmasked does not" + ("" if cfg.quick else " (target: the mask costs <= 5%)"))
        print("\n".join(cli.table([
            ["", "zip2zip", "unmasked", "plain", "zip2zip/plain", "zip2zip/unmasked"],
            ["step", fmt(x["zip2zip_bytes_per_s"]), fmt(x["unmasked_bytes_per_s"]), fmt(x["plain_bytes_per_s"]),
             fxs(x), fxs(x, "canonical_over_unmasked")],
            ["build batch", fmt(x["zip2zip_batch_build_bytes_per_s"]), "", fmt(x["plain_batch_build_bytes_per_s"]),
             "", ""]])))
    elif part == "kernels":
        print("\nkernels: forward + backward calls/s")
        print("\n".join(cli.table([[what] + [f"{key} {fx(v) if key == 'speedup' else fmt(v)}" for key, v in row.items()
                                            if not key.endswith("_spread")] for what, row in x.items()])))
    sys.stdout.flush()


def check_filled(x, where="bench"):
    """Every figure is a finite number or a string saying why it is missing."""
    if isinstance(x, dict):
        for key, v in x.items():
            check_filled(v, f"{where}.{key}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            check_filled(v, f"{where}[{i}]")
    elif x is None or (isinstance(x, float) and not math.isfinite(x)):
        raise AssertionError(f"{where} is {x}")


def setup(argv):
    """(settings, parts, device, tokenizer) from the command line, every one checked; the data
    sets the parts read are prepared first if missing."""
    cfg = BenchConfig()
    cli.configure(cfg, argv, presets=False, positional=False)
    parts = [p for p in cfg.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--parts={cfg.parts}: unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    if cfg.quick:   # the tiny settings, unless given on the command line
        given = {a[2:].partition("=")[0] for a in argv}
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
    batches = cfg.decode_batches.split(",")
    cli.check(cfg, ("rounds", cfg.rounds >= 1, "1 or more"), ("threads", cfg.threads >= 0, "0 (torch's default) or more"),
              ("max_subtokens", cfg.max_subtokens >= 1, "1 or more"), ("window", cfg.window >= 1, "1 or more"),
              ("n_single", cfg.n_single >= 1, "1 or more"), ("codec_rounds", cfg.codec_rounds >= 1, "1 or more"),
              ("n_batch", cfg.n_batch >= 0, "0 (all) or more"),
              ("decode_batches", all(b.isdigit() and int(b) > 0 for b in batches), "batch sizes like 1,8"),
              ("train_batch_size", cfg.train_batch_size >= 1, "1 or more"),
              ("e2e_bytes", cfg.e2e_bytes >= 1, "1 or more"),
              ("json", not cfg.json or os.path.isdir(os.path.dirname(os.path.abspath(cfg.json))),
               "a file in a folder that exists"))
    # the model's settings, checked by its own config now, not deep inside a part later
    GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
              max_subtokens=cfg.max_subtokens, max_codebook_size=cfg.max_codebook_size,
              recon_max_entries=cfg.recon_max_entries)
    device = cli.device(cfg.device)
    tok = Tokenizer(cfg.max_subtokens, cfg.max_codebook_size)   # GPT-2's ranks, checked here
    if set(parts) - {"kernels"}:   # the other parts read pycode (memory: prose too): prepare them now if missing
        load_tokens("pycode", "val")
    if "memory" in parts:
        load_tokens("prose", "val")
    return cfg, parts, device, tok


def run_fresh(part, cfg):
    """One part's figures and seconds from a fresh process (bench.py --parts=part --fresh=False,
    every other setting as here): nothing that ran before it in this process moves them."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        settings = [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in ("parts", "json", "fresh")]
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *settings, f"--parts={part}",
                            "--fresh=False", f"--json={out}"], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"bench.py --parts={part} failed in its own process:\n"
                               f"{p.stdout[-2000:]}{p.stderr[-4000:]}")
        with open(out) as f:
            report = json.load(f)
    return report[part], report["seconds"][part]


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
               "prefill": lambda: bench_prefill(cfg, device, tok), "memory": lambda: bench_memory(cfg, device, tok),
               "e2e": lambda: bench_e2e(cfg, device, tok), "train": lambda: bench_train(cfg, device, tok),
               "kernels": lambda: bench_kernels(cfg, device)}
    fresh = cfg.fresh and len(parts) > 1
    m = report["machine"]
    print(f"zip2zip bench: {m['device']}, torch {m['torch']}, {m['threads']} threads; "
          f"medians of {cfg.rounds} alternating rounds{'; each part in a fresh process' if fresh else ''}", flush=True)
    if cfg.quick:
        print("quick: toy sizes and few rounds, a check of the plumbing; its figures carry no targets "
              "(those apply to the full run)", flush=True)
    report["seconds"] = {}
    for part in parts:
        t0 = time.perf_counter()
        if fresh:
            report[part], report["seconds"][part] = run_fresh(part, cfg)
        else:
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
