"""
Train a zip2zip GPT, or the plain GPT it is compared with, in the manner of nanoGPT's train.py.

    python train.py                                  # the main job (below)
    python train.py config/plain_cpu.py              # the plain baseline: same code, max_subtokens=1
    python train.py config/adapt_cpu.py              # add hypertokens to the plain model just trained
    python train.py config/adapt_gpt2.py             # adapt GPT-2 (needs `transformers` and network)
    python train.py --init_from=resume --out_dir=out # continue a run exactly where it stopped
    torchrun --standalone --nproc_per_node=4 train.py

With no arguments on a CUDA machine it trains the TrainConfig defaults: a small GPT on the Python
standard library (data/pycode, prepared first if missing), bf16, compiled blocks. Without CUDA
it says so and applies config/cpu.py first: about 10 minutes on 2 cores. Settings apply in
order: TrainConfig defaults, config/cpu.py when there is no CUDA, then the command line (preset
files `config/x.py` of `key = literal` lines, and --key=value), left to right.

What differs from nanoGPT's train.py:
- a training example is a random window of base tokens compressed with a fresh LZW codebook
  until block_size + 1 codes came out (DESIGN.md 4); the codec is pure Python, so background
  workers build batches while the model trains;
- validation runs on fixed windows of base tokens and reports bits per byte (the one fair
  yardstick between a plain and a zip2zip model) and the length ratio codes / base tokens;
- a run can start from a plain checkpoint or from GPT-2, in full or with LoRA;
- every random draw is a function of (seed, rank, step), so a resumed run repeats an
  uninterrupted one exactly, whatever ran before.
"""

import math
import os
import queue
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import cli
import zip2zip
from zip2zip import GPT, GPTConfig, HyperBatch, hyper_batch, lzw_encode, lzw_encode_window

REPO = os.path.dirname(os.path.abspath(__file__))
EOT = 50256  # <|endoftext|>: a wall between documents, never merged, 0 bytes of text

# -----------------------------------------------------------------------------
# Settings: every default is the GPU main job; config/cpu.py shrinks it for a CPU


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                # ckpt.pt goes here (out*/ is git-ignored)
    init_from: str = "scratch"          # scratch | resume | gpt2, gpt2-medium/-large/-xl | a folder holding a ckpt.pt to adapt
    overwrite: bool = False             # a new run refuses to replace an existing out_dir/ckpt.pt unless True
    eval_interval: int = 250            # steps between evaluations, each followed by a checkpoint
    eval_windows: int = 256             # fixed validation windows of block_size base tokens (~18% of pycode val)
    log_interval: int = 10              # steps between log lines (each one syncs the device)
    eval_only: bool = False             # evaluate the model as loaded, then stop
    sample_tokens: int = 256            # codes generated at the end, to see what was learned (0: none)
    # data
    dataset: str = "pycode"             # data/<name>/ (prepared if missing), or a path to a folder with train.bin, val.bin
    batch_size: int = 16                # rows per micro-batch
    gradient_accumulation_steps: int = 2  # micro-batches per step, over all DDP ranks together: 32 x 1024 codes
    loader: str = "process"             # process | thread | sync: the codec is pure Python, processes avoid the GIL
    num_workers: int = 0                # batch-building workers per rank; 0: the CPU cores per rank minus 2, at least 1
    # model: GPTConfig's fields (vocab_size is GPT-2's, disabled_ids follow from no_digit_merges)
    block_size: int = 1024              # context in codes: on code that is ~2.2x as many base tokens
    n_layer: int = 8                    # 8 x 512: ~25M parameters besides the embeddings, enough for ~14M tokens of data
    n_head: int = 8                     # 64 dimensions per head, as GPT-2
    n_embd: int = 512
    dropout: float = 0.1                # the main job reads pycode ~6 times over: some regularisation helps
    bias: bool = False                  # a little faster and as good (nanoGPT); GPT-2's weights have biases
    max_subtokens: int = 4              # M: longest hypertoken; 1 = the plain GPT; the paper finds 3..5 close
    max_codebook_size: int = 1024       # C: hypertokens per sequence; a 1024-code window of code makes ~800
    hyper_n_layer: int = 1              # hyper-encoder depth: 1-2 layers beat mean pooling in the paper
    hyper_n_embd: int = 0               # its width; 0: n_embd // 4, so a new entry costs a few percent of a step
    hyper_n_head: int = 4
    tie_weights: bool = True            # one table (and one hyper-encoder) for input and output, as GPT-2
    recon_lambda: float = 0.1           # weight of the reconstruction loss (the paper's)
    recon_max_entries: int = 256        # hypertokens per micro-batch it is computed on: each costs M rows of (., V) logits
    no_digit_merges: bool = False       # keep digits out of hypertokens (merging hurts the paper's math results)
    # adaptation
    lora_rank: int = 0                  # > 0: LoRA adapters of this rank on the GPT blocks' linears, base weights frozen
    lora_alpha: float = 16.0            # the adapters' output is scaled by alpha / rank (the usual default)
    # AdamW
    learning_rate: float = 1e-3         # peak; a model this small takes more than nanoGPT's 6e-4 for 124M
    max_iters: int = 2500               # 2500 x 32 x 1024 codes: ~6 passes over pycode train
    max_seconds: float = 0.0            # > 0: also stop after this much training time, and decay the LR over it
    weight_decay: float = 0.1           # GPT-3's and nanoGPT's, on matrices only
    beta1: float = 0.9                  # the usual
    beta2: float = 0.95                 # nanoGPT's: steadier than 0.999 for language models
    grad_clip: float = 1.0              # clip the gradient norm at this value; 0: off
    decay_lr: bool = True               # linear warmup then cosine decay to min_lr; False: constant
    warmup_iters: int = 100             # 4% of the steps: Adam's second moments settle first
    lr_decay_iters: int = 0             # the cosine ends here; 0: max_iters
    min_lr: float = 1e-4                # learning_rate / 10, per Chinchilla
    # system
    device: str = "auto"                # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, mps
    dtype: str = "auto"                 # auto: bfloat16 on CUDA if supported, else float32; or float16/bfloat16/float32
    compile: bool = True                # torch.compile each GPT block (fixed shapes; hyper-encoder shapes vary per batch)
    threads: int = 0                    # torch CPU threads; 0: torch's default (DDP on CPU: the cores per process)
    seed: int = 1337                    # any fixed number: with it, every draw repeats exactly


MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "max_subtokens", "max_codebook_size",
              "hyper_n_layer", "hyper_n_embd", "hyper_n_head", "tie_weights", "recon_lambda", "recon_max_entries")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "bias", "tie_weights")  # what adapting takes from the source
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}


def read_config(argv, cuda):
    """(TrainConfig, (model, checkpoint) when resuming else None) from the command line.
    ValueError says what is wrong."""
    cfg = TrainConfig()
    if not cuda:
        cli.configure(cfg, [os.path.join(REPO, "config", "cpu.py")])
    rest = cli.configure(cfg, argv)
    if rest:
        raise ValueError(f"unexpected arguments {rest}: expected preset files config/x.py and --key=value")
    resumed = None
    if cfg.init_from == "resume":   # the run's own settings, then the command line on top
        resumed = cli.load_checkpoint(cfg.out_dir, "cpu")
        ckpt = resumed[1]
        unknown = set(ckpt.get("config", {"?": 0})) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{cfg.out_dir}: not a train.py checkpoint, or another version's (settings {sorted(unknown)})")
        saved, cfg = TrainConfig(**ckpt["config"]), TrainConfig(**ckpt["config"])
        cli.configure(cfg, argv)
        fixed = MODEL_KEYS + ("lora_rank", "no_digit_merges", "dataset")
        changed = [f"{k}={getattr(cfg, k)!r} (the run has {getattr(saved, k)!r})"
                   for k in fixed if getattr(cfg, k) != getattr(saved, k)]
        if changed:
            raise ValueError(f"cannot change on resume: {', '.join(changed)}")
    bad = [k for k, ok in (("loader", cfg.loader in ("process", "thread", "sync")), ("lora_rank", cfg.lora_rank >= 0),
                           ("dtype", cfg.dtype in ("auto", "float32", "bfloat16", "float16")),
                           ("n_embd", cfg.n_embd % cfg.n_head == 0), ("max_subtokens", cfg.max_subtokens >= 1),
                           ("block_size", cfg.block_size >= 2), ("batch_size", cfg.batch_size >= 1),
                           ("gradient_accumulation_steps", cfg.gradient_accumulation_steps >= 1),
                           ("eval_windows", cfg.eval_windows >= 1), ("eval_interval", cfg.eval_interval >= 1),
                           ("log_interval", cfg.log_interval >= 1))
           if not ok]
    if bad:
        raise ValueError(f"--{bad[0]}={getattr(cfg, bad[0])!r} is not allowed (see TrainConfig in train.py)")
    return cfg, resumed

# -----------------------------------------------------------------------------
# Data: random windows of base tokens, each compressed with a fresh codebook


def build_batch(data, starts, block_size, model_config, byte_lengths):
    """Compress the window at each start (fresh codebook) until block_size + 1 codes came out.

    data: uint16 base ids; byte_lengths: UTF-8 bytes per base id. Returns x, y (B, block_size)
    int64 with y = x shifted, the HyperBatch of x (None if plain), and n_bytes of text the targets
    stand for. Example (M=4): [a, b, a, b, a, ..] -> codes [a, b, V, a, ..]: x = [a, b, V, ..],
    y = [b, V, a, ..]. A window that meets the end of the data is padded (x: EOT, y: -1, ignored).
    """
    c = model_config
    pad = EOT if EOT in c.disabled_ids else 0
    xs, ys, n_bytes = [], [], 0
    for s in map(int, starts):
        codes, n_base = lzw_encode_window(data, s, block_size + 1, c.vocab_size, c.max_codebook_size,
                                          c.max_subtokens, c.disabled_ids)
        if len(codes) < 2:
            raise ValueError(f"window at {s}: fewer than 2 base tokens left in data of length {len(data)}")
        fill = block_size + 1 - len(codes)
        xs.append(codes[:-1] + [pad] * fill)
        ys.append(codes[1:] + [-1] * fill)
        # a fresh codebook is empty, so the first code is the base id data[s]; targets cover the rest
        n_bytes += int(byte_lengths[data[s + 1:s + n_base]].sum())
    hyper = hyper_batch(xs, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids) if c.hyper else None
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long), hyper, n_bytes


def step_rng(seed, rank, it, micro, stream):
    """The generator of one micro-step, a function of these numbers alone (stream 0: data, 1: torch)."""
    return np.random.default_rng([seed, rank, it, micro, stream])


def get_batch(data, job, j):
    """Micro-batch j of a rank (step j // accum): windows at random starts, from (seed, rank, j) alone."""
    c, rng = job["mconf"], step_rng(job["seed"], job["rank"], *divmod(j, job["accum"]), 0)
    # block_size + 1 codes cover at most M * (block_size + 1) base ids: a window never runs out
    starts = rng.integers(0, len(data) - c.max_subtokens * (c.block_size + 1) + 1, size=job["batch_size"])
    return build_batch(data, starts, c.block_size, c, job["byte_lengths"])


HYPER_FIELDS = tuple(f.name for f in fields(HyperBatch))   # what a worker sends, in order


def _produce(out, stop, path, job, worker, n_workers):
    """A loader worker: micro-batches first + worker, + n_workers, ... into the queue `out`."""
    torch.set_num_threads(1)
    getattr(out, "cancel_join_thread", lambda: None)()   # a process may exit with batches queued
    data, j = np.memmap(path, dtype=np.uint16, mode="r"), job["first"] + worker
    try:
        while not stop.is_set():
            x, y, hyper, n = get_batch(data, job, j)
            item = (x.numpy(), y.numpy(), hyper and [getattr(hyper, f).numpy() for f in HYPER_FIELDS], n)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            j += n_workers
    except Exception as e:   # handed to the training loop, which raises it
        out.put(RuntimeError(f"batch worker {worker} failed at batch {j}: {type(e).__name__}: {e}"))


class Batches:
    """Micro-batches (x, y, hyper, n_bytes) from job["first"] on, in order, built ahead by workers.

    Batch j is a function of (seed, rank, j) alone, so any number of workers of any kind, and a
    resumed run, see the same batches. Worker w builds batches w, w + n, ... into its own queue.
    kind: "process" (the codec is pure Python: processes sidestep the GIL), "thread" or "sync".
    """

    def __init__(self, path, job, kind, n_workers):
        self.job, self.j, self.kind, self.workers = job, job["first"], kind, []
        self.data = np.memmap(path, dtype=np.uint16, mode="r")
        if kind == "sync":
            return
        import multiprocessing
        mp = multiprocessing.get_context("spawn")   # fork would copy torch's thread pools into the child
        make, Worker, self.stop = ((mp.Queue, mp.Process, mp.Event()) if kind == "process" else
                                   (queue.Queue, threading.Thread, threading.Event()))
        self.queues = [make(maxsize=4) for _ in range(n_workers)]
        self.workers = [Worker(target=_produce, args=(q, self.stop, path, job, w, n_workers), daemon=True)
                        for w, q in enumerate(self.queues)]
        for w in self.workers:
            w.start()

    def next(self):
        j, self.j = self.j, self.j + 1
        if self.kind == "sync":
            return get_batch(self.data, self.job, j)
        w = j % len(self.workers)
        while True:
            try:
                item = self.queues[w].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.workers[w].is_alive():
                    raise RuntimeError(f"batch worker {w} died") from None
        if isinstance(item, Exception):
            raise item
        x, y, hyper, n = item
        return torch.from_numpy(x), torch.from_numpy(y), hyper and HyperBatch(*map(torch.from_numpy, hyper)), n

    def close(self):
        if self.workers:
            self.stop.set()
        for w in self.workers:
            w.join(timeout=2)
            if self.kind == "process" and w.is_alive():
                w.terminate()


def eval_windows(val, n_windows, block_size, model_config, byte_lengths):
    """The fixed validation windows, the same text for every model of this block_size.

    val is cut into consecutive windows of block_size base tokens (so a plain model fits them)
    and n_windows of them, spread evenly, are kept. Each gets an EOT in front (a wall that acts as
    a beginning of text) and a fresh codebook. Returns [(codes, n_base, n_bytes)].
    """
    c, n_total = model_config, len(val) // block_size
    if n_total < n_windows:
        raise ValueError(f"--eval_windows={n_windows}: val.bin holds only {n_total} windows of {block_size} tokens")
    out = []
    for i in np.linspace(0, n_total - 1, n_windows).round().astype(int):
        ids = [EOT] + val[i * block_size:(i + 1) * block_size].tolist()
        codes = lzw_encode(ids, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
        out.append((codes, block_size, int(byte_lengths[ids].sum())))
    return out


def _malloc_trim():
    """glibc's malloc_trim, or None off glibc (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory():
    """Subtle: the hypertoken tensors change size with every batch, and on the CPU glibc keeps
    the freed memory of such tensors around: a CPU run grew by ~20 MB a step (8 GB in the CPU
    preset) without this; with it, memory stays flat at no measurable cost in speed."""
    if _TRIM is not None:
        _TRIM(0)


# -----------------------------------------------------------------------------
# Model: from scratch, from a checkpoint (resume or adapt), or from GPT-2; LoRA

HYPER_PARTS = ("hyper_in.", "hyper_out.", "recon")   # what a plain GPT does not have
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_from_hf(hf):
    """Our state dict from a Hugging Face GPT-2 one (GPT2LMHeadModel or GPT2Model). The names are
    the same (nanoGPT copied them); HF's Conv1D stores weights as (in, out), nn.Linear as (out, in),
    so those four are transposed. The causal-mask buffers attn.bias/attn.masked_bias are skipped."""
    out = {}
    for k, v in hf.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        out[k] = v.t() if k.endswith(CONV1D) else v
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])  # tied; GPT2Model has no head
    return out


def gpt2_state_to_hf(state):
    """The inverse of gpt2_state_from_hf on the base weights (to check it, or to export)."""
    return {k: v.t() if k.endswith(CONV1D) else v for k, v in state.items() if not k.startswith(HYPER_PARTS)}


def load_base_weights(model, state):
    """Copy every base (plain GPT) weight of `state` into model; ValueError names any that is
    missing or does not fit. Hypertoken parts load too when `state` has them in the same shape,
    else they stay new. Returns the names of the parameters that did not come from `state`."""
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own, problems, new = model.state_dict(), [], []
    for k, dst in own.items():
        src = state.get(k)
        if k == "transformer.wpe.weight" and src is not None and src.size(0) >= dst.size(0):
            src = src[:dst.size(0)]     # a shorter context keeps the first positions
        if src is not None and src.shape == dst.shape:
            with torch.no_grad():
                dst.copy_(src)          # state_dict tensors share storage with the parameters
        elif k.startswith(HYPER_PARTS):
            new.append(k)
        else:
            problems.append(f"{k} ({'missing' if src is None else f'{tuple(src.shape)}, need {tuple(dst.shape)}'})")
    if problems:
        raise ValueError(f"base weights that do not load: {', '.join(problems)}")
    return new


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) x A^T B^T with W, b frozen. B starts at zero, so the model starts
    exactly as loaded. Keeps `weight` and `bias` under their names, so checkpoints stay nanoGPT's."""

    def __init__(self, base, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear (and peft) do
        self.scale = alpha / rank

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self):
        return self.weight + self.scale * self.lora_B @ self.lora_A


def add_lora(model, rank, alpha):
    """Adapters on the attention and MLP linears of the GPT blocks; only they, the hyper-encoder
    and the reconstruction head train. wte stays frozen: it is tied to the base output layer (39M
    of GPT-2 small's 124M), and the hyper-encoder learns to write into the space the model reads."""
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n or n.startswith(HYPER_PARTS)


def plain_state(model):
    """(the state dict with LoRA folded into the weights, which load_checkpoint reads; what resume
    needs besides: the adapters and the unfolded weights, or None without LoRA)."""
    state, lora = model.state_dict(), {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for k in (".weight", ".lora_A", ".lora_B"):
                lora[name + k] = state.pop(name + k)
            state[name + ".weight"] = m.merged_weight().detach()
    return state, lora or None


def make_model(cfg, mconf, resumed=None):
    """The model on the CPU, as init_from says. Adapting takes the source's architecture (cfg is
    updated) and checks that every base weight loaded; the hyper-encoder is new."""
    if cfg.init_from == "scratch":
        return GPT(mconf)
    if cfg.init_from == "resume":
        model, ckpt = resumed
        if cfg.lora_rank:   # the checkpoint's weights have the adapters folded in: unfold them
            add_lora(model, cfg.lora_rank, cfg.lora_alpha)
            res = model.load_state_dict(ckpt.get("lora") or {}, strict=False)
            if res.unexpected_keys or any("lora_" in k for k in res.missing_keys):
                raise ValueError(f"{cfg.out_dir}: the LoRA state does not fit --lora_rank={cfg.lora_rank}")
        return model
    if cfg.init_from in GPT2_SIZES:
        try:
            from transformers import GPT2LMHeadModel
            state = gpt2_state_from_hf(GPT2LMHeadModel.from_pretrained(cfg.init_from).state_dict())
        except ImportError:
            raise ValueError(f"--init_from={cfg.init_from} needs the optional package transformers") from None
        except OSError as e:
            raise ValueError(f"--init_from={cfg.init_from}: could not fetch the weights: {e}") from None
        arch = dict(zip(("n_layer", "n_head", "n_embd"), GPT2_SIZES[cfg.init_from]), bias=True, tie_weights=True)
        source_block = 1024
    else:
        src, _ = cli.load_checkpoint(cfg.init_from, "cpu")
        arch, state, source_block = {k: getattr(src.config, k) for k in ARCH_KEYS}, src.state_dict(), src.config.block_size
    if cfg.block_size > source_block:
        raise ValueError(f"--block_size={cfg.block_size} is longer than {cfg.init_from}'s {source_block}: "
                         f"its position table has no rows for the rest")
    for k, v in arch.items():
        if getattr(cfg, k) != v:
            print(f"{cfg.init_from} sets {k} = {v!r}")
        setattr(cfg, k, v)
    # a fresh GPTConfig, so that what it derives from n_embd (the hyper-encoder's width) follows
    model = GPT(GPTConfig(**{**asdict(mconf), **arch, "hyper_n_embd": cfg.hyper_n_embd}))
    new = load_base_weights(model, state)
    print(f"loaded every base weight from {cfg.init_from}; new: {', '.join(sorted({k.split('.')[0] for k in new})) or 'nothing'}")
    return model

# -----------------------------------------------------------------------------
# Optimizer, evaluation, learning-rate schedule, checkpoints


def configure_optimizer(model, cfg, device_type):
    # weight decay on matrices (and the recon maps), not on biases and norms; frozen weights left out
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


@torch.no_grad()
def estimate_loss(model, windows, batch_size, ctx, rank=0, world=1):
    """Loss per code, bits per byte and codes per base token on the fixed validation windows.

    Rows are scored in batches: x padded with EOT (a valid code), targets with -1 (ignored).
    bpb = sum of NLL over every code after the leading EOT / (ln 2 * bytes of the window's text).
    """
    c, device = model.config, model.device
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)   # nll (nats), codes, base tokens, bytes
    mine = windows[rank::world]                                   # DDP: each rank scores a share
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        T = max(len(codes) for codes, _, _ in rows) - 1
        x = [codes[:-1] + [EOT] * (T + 1 - len(codes)) for codes, _, _ in rows]
        y = torch.tensor([codes[1:] + [-1] * (T + 1 - len(codes)) for codes, _, _ in rows], device=device)
        hyper = model.hyper_batch(x).to(device) if c.hyper else None
        with ctx:
            logits, _ = model(torch.tensor(x, device=device), hyper=hyper)     # (B, T, V [+ K + 1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        total += torch.tensor([nll.item(), (y >= 0).sum().item(), sum(r[1] for r in rows), sum(r[2] for r in rows)],
                              dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    nll, codes, base, n_bytes = total.tolist()
    return {"loss": nll / codes, "bpb": nll / (math.log(2) * n_bytes), "ratio": codes / base,
            "bytes_per_code": n_bytes / codes}


def get_lr(cfg, it, seconds):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (or at max_seconds, if sooner)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    frac = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    if cfg.max_seconds > 0:   # a time budget: end the schedule when the time ends
        frac = max(frac, seconds / cfg.max_seconds)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))     # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def save_checkpoint(ckpt, out_dir):
    """out_dir/ckpt.pt, atomically: a temporary file in the same folder, synced to disk, renamed
    over the old one. A crash at any point leaves the previous checkpoint whole."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt.pt")
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(out_dir, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

# -----------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # -------------------------------------------------------------------------- setup
    ddp = int(os.environ.get("RANK", -1)) != -1      # launched by torchrun?
    rank, local_rank, world = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    world, local_world, master = max(world, 1), int(os.environ.get("LOCAL_WORLD_SIZE", 1)), rank == 0
    cuda = torch.cuda.is_available()
    try:
        cfg, resumed = read_config(argv, cuda)
        ckpt = resumed and resumed[1]
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        if cfg.device.startswith("cuda") and not cuda:
            raise ValueError(f"--device={cfg.device}: CUDA is not available here")
        if cfg.gradient_accumulation_steps % world:
            raise ValueError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not a "
                             f"multiple of the {world} processes")
        if cfg.init_from != "resume" and os.path.exists(ckpt_path) and not (cfg.overwrite or cfg.eval_only):
            raise ValueError(f"{ckpt_path} exists: continue it with --init_from=resume, choose another "
                             f"--out_dir, or replace it with --overwrite=True")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    try:
        tokenizer = zip2zip.Tokenizer(cfg.max_subtokens, cfg.max_codebook_size, cfg.no_digit_merges)
    except Exception as e:
        raise SystemExit(f"error: cannot load GPT-2's BPE ranks (tiktoken): {e}; offline, set TIKTOKEN_CACHE_DIR")
    if master and not cuda and cfg.init_from != "resume":
        print("no CUDA here: the CPU preset config/cpu.py applies (about 10 minutes on 2 cores)")
    device = cfg.device if cfg.device != "auto" else "cuda" if cuda else "cpu"
    if ddp:
        device = f"cuda:{local_rank}" if cuda else "cpu"
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(device)
        else:   # share the cores between this machine's processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accum = cfg.gradient_accumulation_steps // world
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else \
        "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    mconf = GPTConfig(vocab_size=tokenizer.vocab_size, disabled_ids=tuple(sorted(tokenizer.disabled_ids)),
                      **{k: getattr(cfg, k) for k in MODEL_KEYS})

    # -------------------------------------------------------------------------- data
    folder = cfg.dataset if os.sep in cfg.dataset else os.path.join(REPO, "data", cfg.dataset)
    if master and os.sep not in cfg.dataset and os.path.isfile(os.path.join(folder, "prepare.py")) \
            and not os.path.exists(os.path.join(folder, "meta.json")):
        print(f"data/{cfg.dataset} is missing or incomplete: preparing it first")
        __import__(f"data.{cfg.dataset}.prepare", fromlist=["prepare"]).prepare()
    if ddp:
        torch.distributed.barrier()
    train_path, val_path = (os.path.join(folder, f"{s}.bin") for s in ("train", "val"))
    try:
        for p in (train_path, val_path):
            if not os.path.isfile(p):
                raise ValueError(f"--dataset={cfg.dataset}: no {p}")
        n_train, need = len(np.memmap(train_path, dtype=np.uint16, mode="r")), cfg.max_subtokens * (cfg.block_size + 1)
        if n_train < need:
            raise ValueError(f"{train_path} holds {n_train} tokens; a window of {cfg.block_size + 1} codes may need {need}")
        windows = eval_windows(np.memmap(val_path, dtype=np.uint16, mode="r"), cfg.eval_windows,
                               cfg.block_size, mconf, tokenizer.byte_lengths)

        # ---------------------------------------------------------------------- model
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, mconf, resumed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if cfg.lora_rank and cfg.init_from != "resume":
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if mconf.hyper and (mconf.recon_lambda == 0 or mconf.recon_max_entries == 0):
        model.recon.requires_grad_(False)   # unused: DDP would wait for its gradient
    raw_model, mconf = model.to(device), model.config
    iter_num, train_seconds, best_val_loss = (ckpt[k] for k in ("iter_num", "train_seconds", "best_val_loss")) \
        if ckpt else (0, 0.0, float("inf"))
    if master:
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"model: {model.get_num_params(False) / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), "
              f"M={cfg.max_subtokens}, C={cfg.max_codebook_size}; {world * accum * cfg.batch_size * cfg.block_size:,} "
              f"codes per step ({world} x {accum} x {cfg.batch_size} x {cfg.block_size}); {device}, {dtype}")

    # -------------------------------------------------------------------------- optimizer
    optimizer = configure_optimizer(model, cfg, device_type)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    if cfg.compile:
        for block in model.transformer.h:
            block.compile()     # in place: parameter names stay as they are
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

    # -------------------------------------------------------------------------- loop
    job = dict(first=iter_num * accum, accum=accum, seed=cfg.seed, rank=rank, batch_size=cfg.batch_size,
               mconf=mconf, byte_lengths=tokenizer.byte_lengths)
    batches = Batches(train_path, job, cfg.loader, cfg.num_workers or max(1, (os.cpu_count() or 1) // local_world - 2))

    def next_batch():   # on the device, with the number of targets
        x, y, hyper, n_bytes = batches.next()
        pin = (lambda t: t.pin_memory()) if device_type == "cuda" else (lambda t: t)
        return (pin(x).to(device, non_blocking=True), pin(y).to(device, non_blocking=True),
                hyper and hyper.to(device), n_bytes, int((y >= 0).sum()))

    start_iter, history, metrics = iter_num, [], None
    since_log, total = [0, 0, 0.0], [0, 0, 0.0, 0.0]  # codes, bytes, seconds (, CPU seconds of this process)
    losses = {"lm": 0.0, "recon": 0.0}
    try:
        batch = next_batch()
        while True:
            if ddp and cfg.max_seconds > 0:   # every rank stops, and sets its LR, as rank 0 does
                t = torch.tensor([train_seconds], dtype=torch.float64, device=device)
                torch.distributed.broadcast(t, 0)
                train_seconds = t.item()
            lr = get_lr(cfg, iter_num, train_seconds)
            for group in optimizer.param_groups:
                group["lr"] = lr
            done = iter_num >= cfg.max_iters or 0 < cfg.max_seconds <= train_seconds
            if iter_num % cfg.eval_interval == 0 or done or cfg.eval_only:
                metrics = estimate_loss(raw_model, windows, cfg.batch_size, ctx, rank, world)
                best_val_loss = min(best_val_loss, metrics["loss"])
                if master:
                    print(f"step {iter_num}: val loss {metrics['loss']:.4f}, {metrics['bpb']:.4f} bits per byte, "
                          f"{metrics['ratio']:.3f} codes per base token ({metrics['bytes_per_code']:.2f} bytes per code)")
                if master and iter_num > start_iter:
                    state, lora = plain_state(raw_model)
                    save_checkpoint({"model": state, "model_args": asdict(raw_model.config), "config": asdict(cfg),
                                     "optimizer": optimizer.state_dict(), "iter_num": iter_num,
                                     "best_val_loss": best_val_loss, "train_seconds": train_seconds,
                                     "val": metrics, "lora": lora}, cfg.out_dir)
            if done or cfg.eval_only:
                break
            t0, c0, step = time.perf_counter(), time.process_time(), [0, 0]
            for micro in range(accum):
                x, y, hyper, n_bytes, n_codes = batch
                if ddp:   # sync gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == accum - 1
                # dropout and the reconstruction subsample are a function of the step, like the data
                torch.manual_seed(int(step_rng(cfg.seed, rank, iter_num, micro, 1).integers(2**62)))
                with ctx:
                    _, loss = model(x, y, hyper=hyper)
                    loss = loss / accum
                batch = next_batch()            # built in the background meanwhile
                scaler.scale(loss).backward()
                step = [step[0] + n_codes * world, step[1] + n_bytes * world]
                for k in losses:
                    losses[k] += raw_model.last_losses.get(k, torch.zeros(())) / accum
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            release_freed_memory()
            dt = time.perf_counter() - t0
            train_seconds += dt
            for acc in (since_log, total):
                acc[:3] = [acc[0] + step[0], acc[1] + step[1], acc[2] + dt]
            total[3] += time.process_time() - c0
            iter_num += 1
            if iter_num % cfg.log_interval == 0 or iter_num == start_iter + 1:
                n = iter_num - (history[-1][0] if history else start_iter)
                lm, recon = (float(losses[k]) / n for k in ("lm", "recon"))
                history.append((iter_num, lm, recon))
                if master:
                    print(f"iter {iter_num}: loss {lm:.4f}" + (f", recon {recon:.4f}" if mconf.hyper else "") +
                          f", lr {lr:.2e}, {1000 * dt:.0f} ms, {since_log[0] / since_log[2]:,.0f} codes/s, "
                          f"{since_log[1] / since_log[2]:,.0f} bytes/s")
                losses, since_log = {k: 0.0 for k in losses}, [0, 0, 0.0]
    finally:
        batches.close()

    # -------------------------------------------------------------------------- summary, sample
    codes_s, bytes_s = (v / max(total[2], 1e-9) for v in total[:2])
    if master and total[2] > 0:
        print(f"trained {iter_num - start_iter} steps in {total[2]:.0f} s ({total[3]:.0f} s of CPU): {codes_s:,.0f} codes/s, {bytes_s:,.0f} "
              f"bytes of text/s; val {metrics['bpb']:.4f} bits per byte at {metrics['ratio']:.3f} codes per base "
              f"token; checkpoint {ckpt_path}")
    if master and cfg.sample_tokens > 0:
        torch.manual_seed(cfg.seed)
        raw_model.eval()
        with ctx:
            codes = raw_model.generate([[EOT]], cfg.sample_tokens, temperature=0.8, top_k=200)[0]
        print(f"sample ({cfg.sample_tokens} codes{', hypertokens marked' if mconf.hyper else ''}):")
        print(cli.show(tokenizer, codes[1:], color=sys.stdout.isatty()))
    if ddp:
        torch.distributed.destroy_process_group()
    return {"history": history, "val": metrics, "iter_num": iter_num, "train_seconds": train_seconds,
            "codes_per_s": codes_s, "bytes_per_s": bytes_s, "cpu_seconds": total[3]}


if __name__ == "__main__":
    main()
