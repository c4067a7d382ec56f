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
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

import kernels
import zip2zip
from evals import multiview
from lib import adapt, cli, ddp, loader, outdir, report
from lib.loader import EOT, build_batch
from lib.meter import Meter, flops_per_batch, hms, sync
from zip2zip import GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Settings: every default is the GPU main job; config/cpu.py shrinks it for a CPU


# The model's settings are GPTConfig's (zip2zip.py says what each means), but vocab_size and disabled_ids,
# which the tokenizer sets. The main job's model is smaller than GPTConfig's default (GPT-2 small):
MAIN_JOB = {   # field: (value, why)
    "n_layer": (8, "8 x 512: ~25M parameters besides the embeddings, enough for ~14M tokens of data"),
    "n_head": (8, "64 dimensions per head, as GPT-2"),
    "n_embd": (512, "see n_layer"),
    "dropout": (0.1, "the main job reads pycode about 12 times over: some regularisation helps"),
    "bias": (False, "a little faster and as good (nanoGPT); adapting GPT-2 takes its biases"),
}
ModelSettings = cli.fields_of(GPTConfig, MAIN_JOB, but=("vocab_size", "disabled_ids"))
MODEL_FIELDS = tuple(f.name for f in fields(ModelSettings))
FIXED = ("lora_rank", "lora_alpha", "no_digit_merges", "dataset")   # besides the model's: a resumed run keeps them


@dataclass
class TrainConfig(ModelSettings):
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
    no_digit_merges: bool = False       # keep digits out of hypertokens (merging hurts the paper's math results)
    # adaptation
    lora_rank: int = 0                  # > 0: LoRA adapters of this rank on the GPT blocks' linears, base weights frozen
    lora_alpha: float = 16.0            # the adapters' output is scaled by alpha / rank (the usual default)
    # AdamW
    learning_rate: float = 1e-3         # peak; a model this small takes more than nanoGPT's 6e-4 for 124M
    max_iters: int = 2500               # 2500 x 32 x 1024 codes: about 12 passes over pycode train
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


def model_config(cfg, tokenizer=None):
    """The GPTConfig of the settings (with the tokenizer's vocabulary, if given), checked by
    GPTConfig itself: its ValueError names the flags (`n_head=3` becomes `--n_head=3`)."""
    extra = {} if tokenizer is None else \
        dict(vocab_size=tokenizer.vocab_size, disabled_ids=tuple(sorted(tokenizer.disabled_ids)))
    return cli.config_of(GPTConfig, cfg, MODEL_FIELDS, **extra)


def check_config(cfg, world):
    """ValueError naming the first setting that cannot work. It reads no file, so it runs before
    any checkpoint or data is loaded, and a typo is never blamed on them."""
    c = cfg
    model_config(cfg)   # the model's settings, checked where they are declared
    # (setting, whether its value can work, what it must be): training's own, and three that GPTConfig leaves
    rules = (("hyper_n_embd", c.hyper_n_embd >= 0, "0 (n_embd // 4) or more"),
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
    cli.device(c.device)   # unknown, or not on this machine: ValueError naming --device


def read_config(argv, cuda, world):
    """The TrainConfig of the command line, checked. ValueError says what is wrong."""
    cfg = TrainConfig()   # without CUDA config/cpu.py comes first, in the same call: --help shows it
    rest = cli.configure(cfg, ([] if cuda else [os.path.join(REPO, "config", "cpu.py")]) + list(argv))
    if rest:
        raise ValueError(f"unexpected arguments {rest}: expected preset files config/x.py and --key=value")
    check_config(cfg, world)
    return cfg


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
    """Loss per code, bits per byte (DESIGN.md 4: the prefix NLL of each window's text, 2.2) and codes
    per base token on the fixed validation windows; beam > 0 adds bpb_multiview, the text scored over
    every segmentation the beam finds (multiview.marginal_nll). Rows are padded: x with EOT (a valid
    code), targets with -1 (ignored). static: every batch is (batch_size, block_size), so that a
    compiled model sees training's shapes and compiles nothing new (the same numbers)."""
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
        env = setup(argv, held)                              # settings, processes, device, the out_dir
        train_path, windows = loader.open_data(env, REPO)    # the data, checked; the fixed validation windows
        run = build_model(env)                               # model, optimizer, the step reached
        meter = train(env, run, train_path, windows, held)   # the loop, evaluating and saving
        return finish(env, run, meter)                       # summary, sample


# -------------------------------------------------------------------------- setup; the model (lib/adapt.make_model)


def setup(argv, held):
    """The settings, checked; the DDP processes, the device, autocast; the out_dir's lock."""
    env = ddp.ranks()                   # this process, of those torchrun started (if it did)
    env.cuda = torch.cuda.is_available()
    with cli.one_line_errors():   # OSError too: GPT-2's ranks missing or damaged
        cfg = read_config(argv, env.cuda, env.world)
        env.writes = env.master and not cfg.eval_only    # rank 0 writes out_dir, and holds it until the end
        cfg, env.resumed = outdir.claim(cfg, argv, MODEL_FIELDS + FIXED, env.writes, held)   # locked, resumed
        if env.resumed:
            check_config(cfg, env.world)
        env.ckpt, env.ckpt_path = env.resumed and env.resumed[1], os.path.join(cfg.out_dir, "ckpt.pt")
        env.tokenizer = zip2zip.Tokenizer(cfg.max_subtokens, cfg.max_codebook_size, cfg.no_digit_merges)
    env.cfg = cfg
    if env.master and not env.cuda and cfg.init_from != "resume":
        print("no CUDA here: the CPU preset config/cpu.py applies first" +
              (f"; it trains for at most {hms(cfg.max_seconds)} (h:mm:ss)" if cfg.max_seconds > 0 else ""))
    ddp.place(env, cfg)     # the device, joined with the other ranks; dtype and autocast; accum
    env.mconf = model_config(cfg, env.tokenizer)
    return env


def build_model(env):
    """The run's state: the model on the device (raw_model; model: compiled blocks, DDP), its
    optimizer and scaler, the step reached, the best validation loss, the log."""
    cfg, ckpt = env.cfg, env.ckpt
    torch.manual_seed(cfg.seed)
    with cli.one_line_errors():
        model, cfg = adapt.make_model(cfg, env.mconf, env.resumed)   # scratch, resume, adapt; LoRA
    if model.config.has_hypertokens and (model.config.recon_lambda == 0 or model.config.recon_max_entries == 0):
        model.recon.requires_grad_(False)   # unused: DDP would wait for its gradient
    run = SimpleNamespace(raw_model=model.to(env.device), metrics=None, history=[], stop=False, eval_seconds=0.0,
                          last_eval=0.0)
    env.cfg, env.mconf = cfg, model.config  # adapting takes the source's architecture
    if env.device_type == "cuda":
        kernels.use_kernels(model)          # the fused embedding lookups
    outdir.restore(run, ckpt, cfg)      # the step reached, its time, the best loss, the log (or a new run's)
    if env.master:
        report.model(env, model)            # parameters (trained), M, C, codes per step, device, dtype
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
        report.evaluation(it, m, cfg.eval_beam)
    if env.writes:
        run.log["evals"] = [e for e in run.log["evals"] if e["iter"] < it] + \
            [{"iter": it, "train_seconds": run.train_seconds, **m}]
        save(env, run)
    run.last_eval = time.perf_counter() - t0              # for the ETA: evaluations take time too
    run.eval_seconds += run.last_eval


# -------------------------------------------------------------------------- the loop, and the end: summary, sample


def train(env, run, train_path, windows, held):
    """Step until max_iters, max_seconds, eval_only or Ctrl-C; evaluate every eval_interval
    steps and at the end. Returns the Meter of the steps taken."""
    cfg, device, accum = env.cfg, env.device, env.accum
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
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        done = run.iter_num >= cfg.max_iters or 0 < cfg.max_seconds <= run.train_seconds
        if run.iter_num % cfg.eval_interval == 0 or done or cfg.eval_only:
            evaluate(env, run, windows)
        if done or cfg.eval_only:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        batch = train_step(env, run, batch, next_batch, meter, losses)
        loader.release_freed_memory()
        run.iter_num += 1
        logged = run.iter_num % cfg.log_interval == 0 or run.iter_num == run.start_iter + 1
        if logged or run.iter_num % cfg.eval_interval == 0 or run.iter_num >= cfg.max_iters:
            sync(device)    # a figure or an evaluation follows: the step's time includes its queued work
        dt = time.perf_counter() - t0
        run.train_seconds += dt
        meter.add(seconds=dt, cpu=time.process_time() - c0)
        if logged:
            report.progress(env, run, losses, lr, dt, meter, batches, time.perf_counter())
            losses = {k: 0.0 for k in losses}
    return meter


def train_step(env, run, batch, next_batch, meter, losses):
    """One optimizer step: accum micro-steps (forward, backward, each loss added to `losses`), the
    gradient norm clipped, the step taken, the gradients cleared. Returns the next step's first batch."""
    cfg, model, optimizer, scaler, accum = env.cfg, run.model, run.optimizer, run.scaler, env.accum
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
        meter.add(codes=n_codes * env.world, bytes=n_bytes * env.world, flops=flops)
        for k in losses:
            losses[k] += parts.get(k, torch.zeros(())) / accum
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)      # first: the norm is the true gradient's, not float16's scaled one
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return batch


def finish(env, run, meter):
    """Save an interrupted run, say what was done, write a sample; the figures main returns."""
    if env.writes and run.stop:
        save(env, run)
    report.summary(env, run, meter)     # (lib/report.py) stopped, trained, or nothing to train
    if env.master and env.cfg.sample_tokens > 0 and not run.stop:
        report.sample(env, run)
    if env.ddp:
        torch.distributed.barrier()     # rank 0 may still be saving: nobody leaves before it is done
        torch.distributed.destroy_process_group()
    if run.stop:
        raise SystemExit(130)           # interrupted: not a success (the shell's code for Ctrl-C)
    return report.figures(run, meter)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # before training began, or after it ended: nothing to save
        raise SystemExit("interrupted") from None
