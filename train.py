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
it says so and applies config/cpu.py first. Settings apply in order: TrainConfig defaults,
config/cpu.py when there is no CUDA, then the command line (preset files `config/x.py` of
`key = literal` lines, and --key=value), left to right; all are checked before any work.

A run writes out_dir/ckpt.pt and out_dir/log.json (curves, for plots: lib/outdir.py has its format)
and holds out_dir/train.lock, so a second training into the same folder is refused. Ctrl-C stops
after the current step, saves, and prints the command that resumes.

What differs from nanoGPT's train.py:
- a training example is a random window of base tokens compressed with a fresh LZW codebook
  until block_size + 1 codes came out (DESIGN.md 4); the codec is pure Python, so background
  workers (lib/loader.py) build batches while the model trains;
- validation runs on fixed windows of base tokens and reports bits per byte (the one fair
  yardstick between a plain and a zip2zip model) and the length ratio codes / base tokens;
- a run can start from a plain checkpoint or from GPT-2, in full or with LoRA (lib/adapt.py);
- every random draw is a function of (seed, rank, step), so a resumed run repeats an
  uninterrupted one exactly, whatever ran before.
"""

import math
import os
import sys
import time
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

import fastgen
import kernels
import zip2zip
from evals import multiview
from lib import adapt, cli, loader, outdir
from lib.loader import EOT, build_batch, check_tokens, eval_windows
from lib.meter import Meter, eta_seconds, flops_per_batch, hms, sync
from zip2zip import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Settings: every default is the GPU main job; config/cpu.py shrinks it for a CPU


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                # ckpt.pt and log.json go here (out*/ is git-ignored)
    init_from: str = "scratch"          # scratch | resume | gpt2, gpt2-medium/-large/-xl | a folder holding a ckpt.pt to adapt
    overwrite: bool = False             # a new run refuses to replace an existing out_dir/ckpt.pt unless True
    eval_interval: int = 250            # steps between evaluations, each followed by a checkpoint and log.json
    eval_windows: int = 256             # fixed validation windows of block_size base tokens (~18% of pycode val)
    log_interval: int = 10              # steps between log lines (each one syncs the device)
    eval_only: bool = False             # evaluate the model as loaded, then stop (writes nothing)
    eval_beam: int = 0                  # > 0: also the multi-view bits per byte, summed over segmentations by a
                                        # beam this wide (multiview.marginal_nll; seconds per window on a CPU); 0: off
    sample_tokens: int = 256            # codes generated at the end, to see what was learned (0: none)
    # data
    dataset: str = "pycode"             # data/<name>/ (prepared if missing), or a path to a folder with train.bin, val.bin
    batch_size: int = 16                # rows per micro-batch
    gradient_accumulation_steps: int = 2  # micro-batches per step, over all DDP ranks together: 32 x 1024 codes;
                                        # each rank takes an equal share, at least one (more ranks: a bigger step)
    loader: str = "process"             # process | thread | sync: the codec is pure Python, processes avoid the GIL
    num_workers: int = 0                # batch-building workers per rank; 0: lib/loader.py's default_workers (1 to 4)
    # model: GPTConfig's fields (vocab_size is GPT-2's, disabled_ids follow from no_digit_merges)
    block_size: int = 1024              # context in codes: on code that is ~2.2x as many base tokens
    n_layer: int = 8                    # 8 x 512: ~25M parameters besides the embeddings, enough for ~14M tokens of data
    n_head: int = 8                     # 64 dimensions per head, as GPT-2
    n_embd: int = 512
    dropout: float = 0.1                # the main job reads pycode ~6 times over: some regularisation helps
    bias: bool = False                  # a little faster and as good (nanoGPT); GPT-2's weights have biases
    max_subtokens: int = 4              # M: longest hypertoken; 1 = the plain GPT; the paper finds 3..5 close
    max_codebook_size: int = 1024       # C: hypertokens per sequence; a 1024-code window of code makes ~800
    canonical: bool = True              # score only canonical codes, so the NLL is -log P(text) (DESIGN.md 2.1);
                                        # False: the paper's unmasked vocabulary
    hyper_encoder: str = "transformer"  # transformer | mlp | mean: how a hypertoken is embedded from its base tokens
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
              "canonical", "hyper_encoder", "hyper_n_layer", "hyper_n_embd", "hyper_n_head", "tie_weights",
              "recon_lambda", "recon_max_entries")


def check_config(cfg, world):
    """ValueError naming the first setting that cannot work. It reads no file, so it runs before
    any checkpoint or data is loaded, and a typo is never blamed on them."""
    c = cfg
    rules = (  # (setting, whether its value can work, what it must be)
        ("n_layer", c.n_layer >= 1, "at least 1"), ("n_head", c.n_head >= 1, "at least 1"),
        ("n_embd", c.n_embd >= 1, "at least 1"),
        ("hyper_n_layer", c.hyper_n_layer >= 1, "at least 1"), ("hyper_n_head", c.hyper_n_head >= 1, "at least 1"),
        ("hyper_encoder", c.hyper_encoder in ("transformer", "mlp", "mean"), "transformer, mlp or mean"),
        ("hyper_n_embd", c.hyper_n_embd >= 0, "0 (n_embd // 4) or more"),
        ("block_size", c.block_size >= 2, "at least 2"), ("max_subtokens", c.max_subtokens >= 1, "at least 1"),
        ("max_codebook_size", c.max_codebook_size >= 0, "0 or more"), ("dropout", 0 <= c.dropout < 1, "in [0, 1)"),
        ("recon_lambda", c.recon_lambda >= 0, "0 or more"), ("recon_max_entries", c.recon_max_entries >= 0, "0 or more"),
        ("lora_rank", c.lora_rank >= 0, "0 (off) or more"), ("batch_size", c.batch_size >= 1, "at least 1"),
        ("gradient_accumulation_steps", c.gradient_accumulation_steps >= 1 and
         (c.gradient_accumulation_steps % world == 0 or world % c.gradient_accumulation_steps == 0),
         f"a positive multiple or divisor of the {world} processes"),
        ("eval_interval", c.eval_interval >= 1, "at least 1"), ("eval_windows", c.eval_windows >= 1, "at least 1"),
        ("log_interval", c.log_interval >= 1, "at least 1"), ("sample_tokens", c.sample_tokens >= 0, "0 or more"),
        ("eval_beam", c.eval_beam >= 0, "0 (off) or more"),
        ("learning_rate", c.learning_rate >= 0, "0 or more"), ("min_lr", c.min_lr >= 0, "0 or more"),
        ("max_iters", c.max_iters >= 0, "0 or more"), ("max_seconds", c.max_seconds >= 0, "0 (no limit) or more"),
        ("warmup_iters", c.warmup_iters >= 0, "0 or more"), ("lr_decay_iters", c.lr_decay_iters >= 0, "0 or more"),
        ("weight_decay", c.weight_decay >= 0, "0 or more"), ("grad_clip", c.grad_clip >= 0, "0 (off) or more"),
        ("beta1", 0 <= c.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= c.beta2 < 1, "in [0, 1)"),
        ("loader", c.loader in ("process", "thread", "sync"), "process, thread or sync"),
        ("num_workers", c.num_workers >= 0, "0 (automatic) or more"), ("threads", c.threads >= 0, "0 (torch's) or more"),
        ("dtype", c.dtype in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"))
    for key, ok, what in rules:
        if not ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}: expected {what}")
    for heads, width in (("n_head", "n_embd"), ("hyper_n_head", "hyper_n_embd")):   # both named: either may be the typo
        if getattr(c, width) % getattr(c, heads):
            raise ValueError(f"--{heads}={getattr(c, heads)} does not divide --{width}={getattr(c, width)}: "
                             f"each head gets {width} / {heads} dimensions")
    cli.device(c.device)   # unknown, or not on this machine: ValueError naming --device


def read_config(argv, cuda, world):
    """The TrainConfig of the command line, checked. ValueError says what is wrong."""
    cfg = TrainConfig()   # without CUDA config/cpu.py comes first, in the same call: --help shows it
    rest = cli.configure(cfg, ([] if cuda else [os.path.join(REPO, "config", "cpu.py")]) + list(argv))
    if rest:
        raise ValueError(f"unexpected arguments {rest}: expected preset files config/x.py and --key=value")
    check_config(cfg, world)
    return cfg


def resume_config(cfg, argv, cuda, world):
    """(the run's own settings with the command line on top, (model, checkpoint)) of out_dir."""
    resumed = cli.load_checkpoint(cfg.out_dir, "cpu")
    unknown = set(resumed[1].get("config", {"?": 0})) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{cfg.out_dir}: not a train.py checkpoint, or another version's (settings {sorted(unknown)})")
    saved, new = TrainConfig(**resumed[1]["config"]), TrainConfig(**resumed[1]["config"])
    cli.configure(new, argv)
    new.out_dir = cfg.out_dir       # where it was found (and locked), even if the folder was renamed
    changed = [f"{k}={getattr(new, k)!r} (the run has {getattr(saved, k)!r})"
               for k in MODEL_KEYS + ("lora_rank", "lora_alpha", "no_digit_merges", "dataset")
               if getattr(new, k) != getattr(saved, k)]
    if changed:
        raise ValueError(f"cannot change on resume: {', '.join(changed)}")
    check_config(new, world)
    return new, resumed

# -----------------------------------------------------------------------------
# Data: random windows of base tokens, each compressed with a fresh codebook (loader.build_batch)


def step_rng(seed, rank, it, micro, stream):
    """The generator of one micro-step, a function of these numbers alone (stream 0: data, 1: torch)."""
    return np.random.default_rng([seed, rank, it, micro, stream])


def get_batch(data, job, j):
    """Micro-batch j of a rank (step j // accum): windows at random starts, from (seed, rank, j) alone.
    loader.Batches calls it, in background workers."""
    c, rng = job["mconf"], step_rng(job["seed"], job["rank"], *divmod(j, job["accum"]), 0)
    # block_size + 1 codes cover at most M * (block_size + 1) base ids: a window never runs out
    starts = rng.integers(0, len(data) - c.max_subtokens * (c.block_size + 1) + 1, size=job["batch_size"])
    return build_batch(data, starts, c.block_size, c, job["byte_lengths"])


# -----------------------------------------------------------------------------
# Model: from scratch, from a checkpoint (resume or adapt), or from GPT-2; LoRA (lib/adapt.py)


def make_model(cfg, mconf, resumed=None):
    """(the model on the CPU, as init_from says, with LoRA adapters when lora_rank > 0; the run's
    settings). Adapting takes the source's architecture (the settings returned are a copy that
    holds it) and checks that every base weight loaded."""
    if cfg.init_from == "resume":
        model, ckpt = resumed
        if cfg.lora_rank:   # the checkpoint holds the weights with the adapters folded in
            adapt.unfold_lora(model, ckpt.get("lora"), cfg.lora_rank, cfg.lora_alpha, cfg.out_dir)
        return model, cfg
    model, cfg = (GPT(mconf), cfg) if cfg.init_from == "scratch" else adapt.adapted_model(cfg, mconf)
    if cfg.lora_rank:
        adapt.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return model, cfg


# -----------------------------------------------------------------------------
# Optimizer, evaluation, learning-rate schedule


def configure_optimizer(model, cfg, device_type):
    # weight decay on matrices (and the recon maps), not on biases and norms; frozen weights left out
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


@torch.no_grad()
def estimate_loss(model, windows, batch_size, ctx, rank=0, world=1, static=False, beam=0):
    """Loss per code, bits per byte and codes per base token on the fixed validation windows; with
    beam > 0 also the multi-view bits per byte (bpb_multiview: the windows' base tokens scored over
    every segmentation the beam finds, multiview.marginal_nll).

    Rows are scored in batches: x padded with EOT (a valid code), targets with -1 (ignored).
    static: every batch is padded to (batch_size, block_size), pad rows all EOT with no targets, so
    that a compiled model sees training's shapes and compiles nothing new (the same numbers, for
    the price of computing the padding).
    bpb = NLL that the model's text starts with the window's (DESIGN.md 2.2: every code after the
    leading EOT, the last one summed over the codes that may stand there) / (ln 2 * bytes of the
    window's text).
    """
    c, device = model.config, model.device
    model.eval()
    total = torch.zeros(5, dtype=torch.float64, device=device)   # nll (nats), codes, base tokens, bytes, multi-view nll
    mine = windows[rank::world]                                   # DDP: each rank scores a share
    for i in range(0, len(mine), batch_size):
        rows = [codes for codes, _, _ in mine[i:i + batch_size]]
        T = c.block_size if static else max(map(len, rows)) - 1
        rows += [[EOT]] * (batch_size - len(rows)) if static else []
        x = [codes[:-1] + [EOT] * (T + 1 - len(codes)) for codes in rows]
        y = torch.tensor([codes[1:] + [-1] * (T + 1 - len(codes)) for codes in rows], device=device)
        hyper = model.hyper_batch(x).to(device) if c.has_hypertokens else None
        with ctx:
            logits, _ = model(torch.tensor(x, device=device), hyper=hyper)     # (B, T, V [+ K + 1])
        # the last code of each window is scored as the text going on past it (DESIGN.md 2.2): the
        # summed probability of every code that may stand there, not only the one written
        last = [(b, len(codes) - 2, model.last_code_choices(codes)) for b, codes in enumerate(rows) if len(codes) > 1]
        y[[b for b, _, _ in last], [t for _, t, _ in last]] = -1
        nll = zip2zip.token_nll(logits, y).sum() - sum(
            logits[b, t].float().log_softmax(-1)[choices].logsumexp(0) for b, t, choices in last)
        base, n_bytes = (sum(w[k] for w in mine[i:i + batch_size]) for k in (1, 2))
        n_codes = (y >= 0).sum().item() + len(last)
        total += torch.tensor([nll.item(), n_codes, base, n_bytes, 0], dtype=torch.float64, device=device)
    for codes, _, _ in mine if beam else []:
        with ctx:
            total[4] += multiview.marginal_nll(model, zip2zip.lzw_decode(codes, c.vocab_size, c.max_codebook_size,
                                                              c.max_subtokens, c.disabled_ids), beam)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    nll, codes, base, n_bytes, nll_views = total.tolist()
    return {"loss": nll / codes, "bpb": nll / (math.log(2) * n_bytes), "ratio": codes / base,
            "bytes_per_code": n_bytes / codes, **({"bpb_multiview": nll_views / (math.log(2) * n_bytes)} if beam else {})}


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


# -----------------------------------------------------------------------------
# A run, phase by phase: setup, data, model and optimizer, the loop (evaluating and saving), the end


def main(argv=None):
    """Train as the settings say; returns the figures tests and evals/reproduce.py read."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with ExitStack() as held:   # released however main ends: the out_dir lock, Ctrl-C's handler, the workers
        env = setup(argv, held)                          # settings, processes, device, the out_dir
        train_path, windows = load_data(env)             # the data, checked; the fixed validation windows
        run = build_model(env)                           # model, optimizer, the step reached
        meter = train(env, run, train_path, windows, held)   # the loop, evaluating and saving
        return finish(env, run, meter)                   # summary, sample


# -------------------------------------------------------------------------- setup


def setup(argv, held):
    """The settings, checked; the DDP processes, the device, autocast; the out_dir's lock."""
    env = SimpleNamespace(ddp=int(os.environ.get("RANK", -1)) != -1)      # launched by torchrun?
    env.rank, env.local_rank, world = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    env.world, env.local_world = max(world, 1), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    env.master, env.cuda = env.rank == 0, torch.cuda.is_available()
    try:
        cfg = read_config(argv, env.cuda, env.world)
        env.writes = env.master and not cfg.eval_only    # rank 0 writes out_dir, and holds it until the end
        if env.writes and (cfg.init_from != "resume" or os.path.isdir(cfg.out_dir)):
            held.enter_context(outdir.lock(cfg.out_dir))
        cfg, env.resumed = resume_config(cfg, argv, env.cuda, env.world) if cfg.init_from == "resume" else (cfg, None)
        env.ckpt, env.ckpt_path = env.resumed and env.resumed[1], os.path.join(cfg.out_dir, "ckpt.pt")
        if env.writes and not env.ckpt and os.path.exists(env.ckpt_path) and not cfg.overwrite:
            raise ValueError(f"{env.ckpt_path} exists: continue it with --init_from=resume, choose another "
                             f"--out_dir, or replace it with --overwrite=True")
        env.tokenizer = zip2zip.Tokenizer(cfg.max_subtokens, cfg.max_codebook_size, cfg.no_digit_merges)
    except (ValueError, OSError) as e:   # OSError: GPT-2's ranks missing or damaged
        raise SystemExit(f"error: {e}")
    env.cfg = cfg
    if env.master and not env.cuda and cfg.init_from != "resume":
        print("no CUDA here: the CPU preset config/cpu.py applies first" +
              (f"; it trains for at most {hms(cfg.max_seconds)} (h:mm:ss)" if cfg.max_seconds > 0 else ""))
    env.device = cli.device(cfg.device)
    if env.ddp:   # as --device says: one GPU per process (NCCL), or the CPU (gloo)
        gpu = env.device.startswith("cuda")
        env.device = f"cuda:{env.local_rank}" if gpu else env.device
        torch.distributed.init_process_group(backend="nccl" if gpu else "gloo")
        if gpu:
            torch.cuda.set_device(env.device)
        else:   # share the cores between this machine's processes
            torch.set_num_threads(max(1, loader.usable_cpus() // env.local_world))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # each rank's share of the step's micro-batches; with more ranks than micro-batches, one each
    # (the step grows: the "codes per step" line says by how much), so that one command runs on 1 to 8 GPUs
    env.accum = max(1, cfg.gradient_accumulation_steps // env.world)
    env.device_type = "cuda" if env.device.startswith("cuda") else "cpu"
    env.dtype, env.ctx = cli.autocast(cfg.dtype, env.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    env.mconf = GPTConfig(vocab_size=env.tokenizer.vocab_size, disabled_ids=tuple(sorted(env.tokenizer.disabled_ids)),
                          **{k: getattr(cfg, k) for k in MODEL_KEYS})
    return env


def load_data(env):
    """(train.bin's path, the validation windows), prepared first if a shipped dataset is missing."""
    cfg = env.cfg
    folder = cfg.dataset if os.sep in cfg.dataset else os.path.join(REPO, "data", cfg.dataset)
    if env.master and os.sep not in cfg.dataset and os.path.isfile(os.path.join(folder, "prepare.py")) \
            and not os.path.exists(os.path.join(folder, "meta.json")):
        print(f"data/{cfg.dataset} is missing or incomplete: preparing it first")
        __import__(f"data.{cfg.dataset}.prepare", fromlist=["prepare"]).prepare()
    if env.ddp:
        torch.distributed.barrier()
    train_path, val_path = (os.path.join(folder, f"{s}.bin") for s in ("train", "val"))
    try:
        for p in (train_path, val_path):
            if not os.path.isfile(p):
                raise ValueError(f"--dataset={cfg.dataset}: no {p}")
            check_tokens(p, env.mconf.vocab_size)
        n_train, need = len(np.memmap(train_path, dtype=np.uint16, mode="r")), cfg.max_subtokens * (cfg.block_size + 1)
        if n_train < need:
            raise ValueError(f"{train_path} holds {n_train} tokens; a window of {cfg.block_size + 1} codes may need {need}")
        windows = eval_windows(np.memmap(val_path, dtype=np.uint16, mode="r"), cfg.eval_windows,
                               cfg.block_size, env.mconf, env.tokenizer.byte_lengths)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    return train_path, windows


def build_model(env):
    """The run's state: the model on the device (raw_model; model: compiled blocks, DDP), its
    optimizer and scaler, the step reached, the best validation loss, the log."""
    cfg, ckpt = env.cfg, env.ckpt
    try:
        torch.manual_seed(cfg.seed)
        model, cfg = make_model(cfg, env.mconf, env.resumed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if model.config.has_hypertokens and (model.config.recon_lambda == 0 or model.config.recon_max_entries == 0):
        model.recon.requires_grad_(False)   # unused: DDP would wait for its gradient
    run = SimpleNamespace(raw_model=model.to(env.device), metrics=None, history=[], stop=False, eval_seconds=0.0,
                          last_eval=0.0)
    env.cfg, env.mconf = cfg, model.config  # adapting takes the source's architecture
    if env.device_type == "cuda":
        kernels.use_kernels(model)          # the fused embedding lookups
    run.iter_num, run.train_seconds, run.best_val_loss = \
        (ckpt[k] for k in ("iter_num", "train_seconds", "best_val_loss")) if ckpt else (0, 0.0, float("inf"))
    run.start_iter = run.saved_iter = run.iter_num
    run.log = {"config": asdict(cfg), **(outdir.read_log(cfg.out_dir, run.iter_num) if ckpt else {"evals": [], "train": []})}
    if env.master:
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"model: {model.get_num_params(False) / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), "
              f"M={cfg.max_subtokens}, C={cfg.max_codebook_size}; "
              f"{env.world * env.accum * cfg.batch_size * cfg.block_size:,} codes per step ({env.world} x {env.accum} "
              f"x {cfg.batch_size} x {cfg.block_size}); {env.device}, {env.dtype}")
    run.optimizer = configure_optimizer(model, cfg, env.device_type)
    if ckpt:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == "float16")
    if cfg.compile:
        for block in model.transformer.h:
            block.compile()     # in place: parameter names stay as they are
    run.model = nn.parallel.DistributedDataParallel(
        model, device_ids=[env.local_rank] if env.device_type == "cuda" else None) if env.ddp else model
    # before it starts: nothing to train (and nothing to write)?
    run.finished = run.iter_num >= cfg.max_iters or 0 < cfg.max_seconds <= run.train_seconds
    env.writes = env.writes and not run.finished
    return run


def save(env, run):
    """log.json, then the checkpoint if there are new steps (a log ahead of the checkpoint is cut
    back on resume)."""
    cfg = env.cfg
    outdir.write_log(cfg.out_dir, run.log)
    if run.iter_num > run.saved_iter:
        state, lora = adapt.plain_state(run.raw_model)
        outdir.save_checkpoint({"model": state, "model_args": asdict(run.raw_model.config), "config": asdict(cfg),
                                "optimizer": run.optimizer.state_dict(), "iter_num": run.iter_num,
                                "best_val_loss": run.best_val_loss, "train_seconds": run.train_seconds,
                                "val": run.metrics, "lora": lora}, cfg.out_dir)
        run.saved_iter = run.iter_num


def evaluate(env, run, windows):
    """estimate_loss on the validation windows; printed, logged and saved with a checkpoint."""
    cfg, it, t0 = env.cfg, run.iter_num, time.perf_counter()
    run.metrics = m = estimate_loss(run.raw_model, windows, cfg.batch_size, env.ctx, env.rank, env.world,
                                    cfg.compile, cfg.eval_beam)
    run.best_val_loss = min(run.best_val_loss, m["loss"])
    if env.master:
        views = f" (multi-view, beam {cfg.eval_beam}: {m['bpb_multiview']:.4f})" if cfg.eval_beam else ""
        print(f"step {it}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits per byte{views}, "
              f"{m['ratio']:.3f} codes per base token ({m['bytes_per_code']:.2f} bytes per code)")
    if env.writes:
        run.log["evals"] = [e for e in run.log["evals"] if e["iter"] < it] + \
            [{"iter": it, "train_seconds": run.train_seconds, **m}]
        save(env, run)
    run.last_eval = time.perf_counter() - t0              # for the ETA: evaluations take time too
    run.eval_seconds += run.last_eval


# -------------------------------------------------------------------------- the loop


def train(env, run, train_path, windows, held):
    """Step until max_iters, max_seconds, eval_only or Ctrl-C; evaluate every eval_interval
    steps and at the end. Returns the Meter of the steps taken."""
    cfg, device, accum, world = env.cfg, env.device, env.accum, env.world
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    job = dict(first=run.iter_num * accum, accum=accum, seed=cfg.seed, rank=env.rank, batch_size=cfg.batch_size,
               mconf=env.mconf, byte_lengths=env.tokenizer.byte_lengths)
    run.interrupt = outdir.Interrupt(env.ddp)       # Ctrl-C: stop after the current step, and save it
    held.callback(run.interrupt.restore)
    n_workers = cfg.num_workers or loader.default_workers(env.local_world)
    batches = None if run.finished or cfg.eval_only else \
        held.enter_context(closing(loader.Batches(train_path, job, cfg.loader, n_workers, get_batch)))

    def next_batch():   # on the device, with its number of targets and its FLOPs
        x, y, hyper, n_bytes = batches.next()
        return (*loader.to_device(x, y, hyper, device), n_bytes, int((y >= 0).sum()),
                flops_per_batch(run.raw_model, *x.shape, hyper))

    meter, losses = Meter(device), {"lm": 0.0, "recon": 0.0}
    batch, run.t_start = batches and next_batch(), time.perf_counter()
    while True:
        run.stop = run.interrupt.requested
        if env.ddp:   # every rank stops, and sets its LR, as the others do
            t = torch.tensor([run.train_seconds, run.stop], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX)
            run.train_seconds, run.stop = t.tolist()
        if run.stop:
            break
        lr = get_lr(cfg, run.iter_num, run.train_seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr
        done = run.iter_num >= cfg.max_iters or 0 < cfg.max_seconds <= run.train_seconds
        if run.iter_num % cfg.eval_interval == 0 or done or cfg.eval_only:
            evaluate(env, run, windows)
        if done or cfg.eval_only:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        for micro in range(accum):
            x, y, hyper, n_bytes, n_codes, flops = batch
            if env.ddp:   # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro == accum - 1
            # dropout and the reconstruction subsample are a function of the step, like the data
            torch.manual_seed(int(step_rng(cfg.seed, env.rank, run.iter_num, micro, 1).integers(2**62)))
            with env.ctx:
                _, loss, parts = model(x, y, hyper=hyper, with_parts=True)
                loss = loss / accum
            batch = next_batch()            # built in the background meanwhile
            scaler.scale(loss).backward()
            meter.add(codes=n_codes * world, bytes=n_bytes * world, flops=flops)
            for k in losses:
                losses[k] += parts.get(k, torch.zeros(())) / accum
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loader.release_freed_memory()
        run.iter_num += 1
        report = run.iter_num % cfg.log_interval == 0 or run.iter_num == run.start_iter + 1
        if report or run.iter_num % cfg.eval_interval == 0 or run.iter_num >= cfg.max_iters:
            sync(device)    # a figure or an evaluation follows: the step's time includes its queued work
        dt = time.perf_counter() - t0
        run.train_seconds += dt
        meter.add(seconds=dt, cpu=time.process_time() - c0)
        if report:
            log_progress(env, run, losses, lr, dt, meter, batches)
            losses = {k: 0.0 for k in losses}
    return meter


def log_progress(env, run, losses, lr, dt, meter, batches):
    """The mean losses since the last log line into the log; on rank 0 a line with speed and ETA."""
    cfg, it = env.cfg, run.iter_num
    n = it - (run.history[-1][0] if run.history else run.start_iter)
    lm, recon = (float(losses[k]) / n for k in ("lm", "recon"))
    if not math.isfinite(lm):   # training data is canonical: no target may ever be masked
        raise SystemExit(f"error: step {it}: the training loss is {lm}: a target lies outside the "
                         f"model's output vocabulary (masked -inf); the batches are not the model's own codes")
    run.history.append((it, lm, recon))
    run.log["train"].append({"iter": it, "train_seconds": run.train_seconds, "loss": lm, "recon": recon})
    if not env.master:
        return
    now = time.perf_counter()
    wall, eta = now - run.t_start, ""                   # evaluations included
    if it == run.start_iter + 1:   # the first step warms up (compilation, first batches):
        run.first_done = now, meter.total["seconds"], run.eval_seconds   # the ETA is timed from the steps after it
    else:
        n = it - run.start_iter - 1      # steps timed; the evaluations among them are counted apart
        step_wall = (now - run.first_done[0] - (run.eval_seconds - run.first_done[2])) / n
        step_train = (meter.total["seconds"] - run.first_done[1]) / n
        left = eta_seconds(it, cfg.max_iters, cfg.max_seconds, run.train_seconds, cfg.eval_interval, step_wall,
                           step_train, run.last_eval)
        eta = f", ETA {hms(left)}"
    built = cfg.loader != "sync" and batches.speed()      # codes/s the workers can build
    print(f"iter {it}: loss {lm:.4f}" + (f", recon {recon:.4f}" if env.mconf.has_hypertokens else "") +
          f", lr {lr:.2e}, {1000 * dt:.0f} ms, {meter.report(built, env.world)}; {hms(wall)} elapsed{eta}")


# -------------------------------------------------------------------------- the end: summary, sample


def finish(env, run, meter):
    """Save an interrupted run, say what was done, write a sample; the figures main returns."""
    cfg, ckpt_path, it, total = env.cfg, env.ckpt_path, run.iter_num, meter.total
    codes_s, bytes_s = (total[k] / max(total["seconds"], 1e-9) for k in ("codes", "bytes"))
    if env.writes and run.stop:
        save(env, run)
        print(f"stopped at step {it}, saved in {ckpt_path}; to continue: "
              f"{outdir.resume_command(cfg.out_dir, env.world)}" if run.saved_iter == it and os.path.exists(ckpt_path)
              else f"stopped at step {it}: nothing to save")
    elif env.master and total["seconds"] > 0:
        print(f"trained {it - run.start_iter} steps in {total['seconds']:.0f} s ({total['cpu']:.0f} s of CPU): "
              f"{codes_s:,.0f} codes/s, {bytes_s:,.0f} bytes of text/s; val {run.metrics['bpb']:.4f} bits per byte at "
              f"{run.metrics['ratio']:.3f} codes per base token; checkpoint {ckpt_path}")
    elif env.master and run.finished and env.ckpt and not cfg.eval_only:
        limit, more = (f"--max_iters={cfg.max_iters}", f"--max_iters={2 * it}") if it >= cfg.max_iters \
            else (f"--max_seconds={cfg.max_seconds:g}", f"--max_seconds={2 * cfg.max_seconds:g}")
        print(f"{ckpt_path} is at step {it}: {limit} is reached, nothing to train. To train longer: "
              f"{outdir.resume_command(cfg.out_dir, env.world, more)}")
    elif env.master and run.finished and not cfg.eval_only:
        print(f"--max_iters={cfg.max_iters}: evaluated the model as it starts, trained nothing, saved nothing")
    if env.master and cfg.sample_tokens > 0 and not run.stop:
        run.interrupt.restore()             # Ctrl-C now just ends the process: all is saved
        torch.manual_seed(cfg.seed)
        run.raw_model.eval()
        with env.ctx:
            codes = fastgen.generate(run.raw_model, [[EOT]], cfg.sample_tokens, temperature=0.8, top_k=200,
                                     compile=cfg.compile)[0]
        print(f"sample ({cfg.sample_tokens} codes):")
        print(cli.show(env.tokenizer, codes[1:], color=sys.stdout.isatty()))
    if env.ddp:
        torch.distributed.barrier()     # rank 0 may still be saving: nobody leaves before it is done
        torch.distributed.destroy_process_group()
    if run.stop:
        raise SystemExit(130)           # interrupted: not a success (the shell's code for Ctrl-C)
    return {"history": run.history, "val": run.metrics, "iter_num": it, "train_seconds": run.train_seconds,
            "codes_per_s": codes_s, "bytes_per_s": bytes_s, "cpu_seconds": total["cpu"]}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # before training began, or after it ended: nothing to save
        raise SystemExit("interrupted") from None
