"""
The paper's headline measurements at small scale, on a CPU, printed as markdown tables.

    python -m evals.reproduce                             # token efficiency and decoding speed (~5 min)
    python -m evals.reproduce out-cpu out-plain-cpu       # and bits per byte of train.py checkpoints
    python -m evals.reproduce --likelihood                # the exact-likelihood set: 8 trainings (~75 min)
    python -m evals.reproduce --ablations                 # the ablation set: 13 trainings (~50 min)
    python -m evals.reproduce --ablations --quick         # the same plumbing on tiny models, in seconds

1. Token efficiency (the paper's Table 2 and merge-size ablation): length ratio codes / base
   tokens and bytes per token before and after, on code (pycode val) and English prose (pydoc
   topics: prose val + train), for M = 1..5; then codebook size against window length at M = 4.
2. Bits per byte of each checkpoint given, on the same fixed validation windows (train.py's
   eval_windows and estimate_loss): the fair yardstick between a plain and a zip2zip model.
3. Decoding speed, zip2zip against plain, at batch 1 (bench.py's decoding benchmark).
4. --likelihood: plain, zip2zip unmasked and canonical, the plain model adapted (full, LoRA) both
   ways and trained on as plain, on the CPU preset: canonical and multi-view bits per byte, and
   how often an unmasked model samples a non-canonical stream.
5. --ablations: merge size, hyper-encoder, digits, seeds, codebook size at equal training time,
   with curves of bits per byte against training seconds (runs/curves.csv, and PNGs with
   matplotlib). Each training run is a folder under --runs holding log.json and summary.json;
   a finished run is reused, so a set that was stopped resumes.
Every figure is measured by this run; the paper's are quoted beside them.
"""

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import bench
import fastgen
from data.common import gpt2_bpe
from evals.efficiency import compression_stats
from lib import cli, report
from zip2zip import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository

# What the paper reports (Geng et al. 2025), for the comparison
PAPER = {"code": -0.35, "prose": -0.15, "code_bytes": (4.1, 6.3), "train_mix_m4": 0.689}


@dataclass
class ReproduceConfig:
    window: int = 1024             # base tokens per fresh codebook in table 1, like a training window
    max_codebook_size: int = 1024  # C of table 1: room for every entry a 1024-token window makes
    codebook_sizes: str = "64,256,1024,4096"   # C of table 2
    windows: str = "1024,4096"     # window lengths of table 2 (a longer window fills a larger codebook)
    max_tokens: int = 0            # use at most this many base tokens of each data set (0: all; tests)
    train_row: bool = True         # also pycode train at M=4 (the training data; ~10 s)
    eval_windows: int = 96         # validation windows for bits per byte (config/cpu.py's count)
    eval_batch_size: int = 16      # windows per forward pass: the result does not depend on it
    decode: bool = True            # measure the decoding speed ratio (bench.py's, batch 1)
    decode_rounds: int = 3         # timed rounds of the decoding benchmark: a median of 3 is steady enough
    threads: int = 0               # torch CPU threads; 0: torch's default (the training runs: 1 is steadier)
    likelihood: bool = False       # train and score the exact-likelihood set instead of the tables
    ablations: bool = False        # train the ablation set instead of the tables
    quick: bool = False            # with those: tiny models, 2 steps a run (checks the plumbing in seconds)
    runs: str = "out-reproduce"    # a folder per training run; a finished run is reused, not trained again
    seconds: float = 180.0         # training time of each ablation run: 13 runs and their evaluations stay
                                   # under an hour on 2 cores
    beams: str = "1,4,16"          # multi-view beam widths (the widest also for the adapted models)
    seed: int = 1337               # train.py's default: the runs are train.py's own jobs


def data_sets(cfg):
    """{name: base ids}: code is pycode val; prose is all of prose, Python's pydoc topics (val +
    train: it is small)."""
    cut = lambda ids: ids[:cfg.max_tokens] if cfg.max_tokens else ids
    return {"code (pycode val)": cut(np.asarray(bench.load_tokens("pycode", "val"))),
            "prose (pydoc topics)": cut(np.concatenate([bench.load_tokens("prose", s) for s in ("val", "train")]))}


def efficiency(tok, ids, window):
    s = compression_stats(tok, ids.tolist(), window)
    return s["bytes"] / s["base_tokens"], s["bytes"] / s["codes"], s["codes"] / s["base_tokens"]


def token_efficiency(cfg, sets):
    print(f"### Token efficiency: fresh codebook every {cfg.window} base tokens, C={cfg.max_codebook_size}\n")
    print("| data | M | bytes/token before | after | length ratio | sequence length |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = {}
    for name, ids in sets.items():
        for M in range(1, 6):
            before, after, r = efficiency(Tokenizer(M, cfg.max_codebook_size), ids, cfg.window)
            ratios[name, M] = r
            print(f"| {name} | {M} | {before:.2f} | {after:.2f} | {r:.3f} | {r - 1:+.1%} |")
    if cfg.train_row:
        ids = np.asarray(bench.load_tokens("pycode", "train"))
        ids = ids[:cfg.max_tokens] if cfg.max_tokens else ids
        before, after, r = efficiency(Tokenizer(4, cfg.max_codebook_size), ids, cfg.window)
        ratios["train", 4] = r
        print(f"| code (pycode train) | 4 | {before:.2f} | {after:.2f} | {r:.3f} | {r - 1:+.1%} |")
    sizes, windows = [int(c) for c in cfg.codebook_sizes.split(",")], [int(w) for w in cfg.windows.split(",")]
    print("\n### Length ratio at M=4: codebook size C against window length (base tokens)\n")
    print("| C | " + " | ".join(f"{n.split()[0]}, window {w}" for n in sets for w in windows) + " |")
    print("|---:|" + "---:|" * (len(sets) * len(windows)))
    for C in sizes:
        tok = Tokenizer(4, C)
        cells = [efficiency(tok, ids, w)[2] for ids in sets.values() for w in windows]
        print(f"| {C} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    return ratios


def load_models(out_dirs, device):
    """[(path, model, checkpoint, tokenizer)] of the checkpoints given; one that cannot be read is
    skipped with a line saying why (the others still compare)."""
    models = []
    for path in out_dirs:
        try:
            model, ckpt = cli.load_checkpoint(path, device)
            models.append((path, model, ckpt, cli.tokenizer_for(model.config)))
        except (FileNotFoundError, ValueError) as e:
            print(f"skipped {path}: {e}")
    return models


def bits_per_byte(cfg, models):
    """Bits per byte of each checkpoint on the same validation text (train.py's fixed windows)."""
    from lib.loader import eval_windows
    from train import estimate_loss
    print("\n### Bits per byte on fixed validation windows (the same text for every model)\n")
    if not models:
        print("no checkpoints: train them first (`python train.py`, `python train.py config/plain_cpu.py`), "
              "then `python -m evals.reproduce out-cpu out-plain-cpu`")
        return {}
    names = {ckpt.get("config", {}).get("dataset", "pycode") for _, _, ckpt, _ in models}
    dataset = names.pop() if len(names) == 1 else "pycode"
    block = min(m.config.block_size for _, m, _, _ in models)   # base tokens per window: every model fits it
    val = bench.load_tokens(dataset, "val") if not os.path.isdir(dataset) else \
        np.memmap(os.path.join(dataset, "val.bin"), dtype=np.uint16, mode="r")
    print(f"{cfg.eval_windows} windows of {block} base tokens of {dataset} val\n")
    print("| checkpoint | M | parameters | steps | training s | bits per byte | codes per base token | bytes per code |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    result = {}
    for path, model, ckpt, tok in models:
        windows = eval_windows(val, cfg.eval_windows, block, model.config, tok.byte_lengths)
        m = estimate_loss(model, windows, cfg.eval_batch_size, nullcontext())
        steps, seconds = ckpt.get("iter_num", "?"), ckpt.get("train_seconds")
        result[path] = (model.config.max_subtokens, m["bpb"], steps)
        print(f"| {path} | {model.config.max_subtokens} | {report.n_params(model) / 1e6:.1f}M | {steps} | "
              f"{'?' if seconds is None else f'{seconds:.0f}'} | {m['bpb']:.4f} | {m['ratio']:.3f} | "
              f"{m['bytes_per_code']:.2f} |")
    return result


def compare(ratios, bpb, speed):
    """The paper's figures next to ours, as sentences with the numbers of this run."""
    code, prose = ratios["code (pycode val)", 4], ratios["prose (pydoc topics)", 4]
    print("\n### Against the paper\n")
    print(f"- Code, M=4: sequence length {code - 1:+.0%} (paper: {PAPER['code']:+.0%} with Llama-3, Qwen "
          f"and Phi-4 tokenizers). Prose: {prose - 1:+.0%} (paper, web text: {PAPER['prose']:+.0%}).")
    on_code = {M: ratios["code (pycode val)", M] for M in range(2, 6)}
    worst = max(on_code, key=on_code.get)                     # the highest length ratio
    spread = max(on_code[M] for M in (3, 4, 5)) - min(on_code[M] for M in (3, 4, 5))
    print(f"- Merge size: on code M={worst} compresses least of M=2..5, and M=3..5 lie within "
          f"{spread:.3f} of each other in length ratio (paper: M=2 trains worst, M=3..5 close).")
    if ("train", 4) in ratios:
        print(f"- Training data at M=4 compressed to {ratios['train', 4]:.1%} of its length "
              f"(paper: the training mix to {PAPER['train_mix_m4']:.1%}).")
    plain = min(((b, s) for M, b, s in bpb.values() if M == 1), default=None)
    zips = min(((b, s) for M, b, s in bpb.values() if M > 1), default=None)
    if plain and zips:
        print(f"- Bits per byte: zip2zip {zips[0]:.4f} after {zips[1]} steps against plain {plain[0]:.4f} after "
              f"{plain[1]} ({zips[0] / plain[0] - 1:+.1%}; paper, adapting pretrained models: a few percent "
              f"worse, e.g. Phi-3.5 byte-PPL 1.58 -> 1.69).")
    if speed:
        print(f"- Decoding at batch 1: zip2zip {speed['ratio']:.2f}x the text bytes/s of plain, "
              f"{speed['ops_ratio']:.2f}x the ops per step (paper: +9% to +48% on an H100).")


# -----------------------------------------------------------------------------
# Training runs: the exact-likelihood set and the ablation set. Each run is train.py in this
# process, in a folder of its own under --runs; a finished run is reused, so an interrupted set
# resumes where it stopped. Every run starts from config/cpu.py (on a GPU too: the same job).

QUICK_RUN = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2", "--max_seconds=0",
             "--max_iters=2", "--warmup_iters=1", "--eval_interval=1", "--eval_windows=4", "--log_interval=1",
             "--loader=sync", "--recon_max_entries=4"]


def train_run(cfg, name, *args):
    """(train.py's summary, its log.json) of the run `name`: trained with config/cpu.py and args
    on top, unless its folder already holds that run, finished."""
    import train
    out = os.path.join(cfg.runs, name)
    argv = [os.path.join(ROOT, "config", "cpu.py"), f"--threads={cfg.threads}", f"--seed={cfg.seed}", "--sample_tokens=0",
            *args, *(QUICK_RUN if cfg.quick else []), f"--out_dir={out}"]
    argv = [a.replace("{runs}", cfg.runs) for a in argv]
    summary_path, done = os.path.join(out, "summary.json"), None
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            done = json.load(f)
    if done and done["argv"] == argv:
        print(f"reusing {out} ({' '.join(args)})")
    else:
        print(f"\n=== {name}: python train.py {' '.join(argv)}", flush=True)
        summary = train.main(argv + ["--overwrite=True"])
        done = {"argv": argv, "summary": {k: summary[k] for k in ("val", "iter_num", "train_seconds", "bytes_per_s",
                                                                  "codes_per_s")}}
        with open(summary_path, "w") as f:   # what log.json lacks: the speed, and the command
            json.dump(done, f)
    with open(os.path.join(out, "log.json")) as f:   # the curves: train.py's own log, the one source
        return done["summary"], json.load(f)


def run_model(cfg, name):
    model, _ = cli.load_checkpoint(os.path.join(cfg.runs, name), "cpu")
    return model.eval()


def windows_of(cfg, model, which=None):
    """The validation windows (train.py's, or those numbered `which`) in `model`'s own codes."""
    from lib.loader import eval_windows
    c, tok = model.config, cli.tokenizer_for(model.config)
    val = bench.load_tokens("pycode", "val")
    return eval_windows(val, 4 if cfg.quick else cfg.eval_windows, c.block_size, c, tok.byte_lengths, which)


def multiview_bpb(cfg, model, beam):
    """Bits per byte of the validation windows summed over segmentations (multiview.marginal_nll), as
    train.py --eval_beam measures it."""
    from train import estimate_loss
    return estimate_loss(model, windows_of(cfg, model), cfg.eval_batch_size, nullcontext(), beam=beam)["bpb_multiview"]


def noncanonical_share(cfg, model, n=32):
    """The share of sampled streams (temperature 1, no top-k) that are not canonical."""
    from zip2zip import lzw_decode, lzw_encode
    c = model.config
    args = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
    torch.manual_seed(cfg.seed)
    rows = fastgen.generate(model, [[50256]] * (4 if cfg.quick else n), 8 if cfg.quick else 128, temperature=1.0)
    return sum(lzw_encode(lzw_decode(r, *args), *args) != r for r in rows) / len(rows)


def likelihood(cfg):
    """The exact-likelihood table: plain, zip2zip unmasked and canonical from scratch (480 s each),
    the plain model adapted in full and with LoRA both ways and trained on as plain (240 s each)."""
    plain = "{runs}/plain"
    runs = {"plain": ("plain GPT (M=1)", ["config/plain_cpu.py"]),
            "unmasked": ("zip2zip, canonical=False", ["--canonical=False"]),
            "canonical": ("zip2zip, canonical=True", ["--canonical=True"]),
            "plain-more": ("plain, trained on (+240 s)", ["config/adapt_cpu.py", f"--init_from={plain}", "--max_subtokens=1"]),
            "adapt-unmasked": ("plain adapted, full, canonical=False", ["config/adapt_cpu.py", f"--init_from={plain}", "--canonical=False"]),
            "adapt-canonical": ("plain adapted, full, canonical=True", ["config/adapt_cpu.py", f"--init_from={plain}", "--canonical=True"]),
            "lora-unmasked": ("plain adapted, LoRA 8, canonical=False", ["config/adapt_cpu.py", f"--init_from={plain}", "--canonical=False", "--lora_rank=8"]),
            "lora-canonical": ("plain adapted, LoRA 8, canonical=True", ["config/adapt_cpu.py", f"--init_from={plain}", "--canonical=True", "--lora_rank=8"])}
    beams = [int(b) for b in cfg.beams.split(",")]
    rows = [["run", "command (on top of config/cpu.py)", "training s", "steps", "bytes of text/s", "bits per byte",
             *[f"multi-view, beam {b}" for b in beams]]]
    result = {}
    for name, (label, args) in runs.items():
        summary, _ = train_run(cfg, name, *[a if a.startswith("--") else os.path.join(ROOT, a) for a in args])
        model = run_model(cfg, name)
        views = [multiview_bpb(cfg, model, b) if not model.config.canonical and (name == "unmasked" or b == beams[-1])
                 else None for b in beams]
        result[name] = {**summary, "multiview": dict(zip(beams, views))}
        rows.append([label, " ".join(args).replace("{runs}/", ""), f"{summary['train_seconds']:.0f}", summary["iter_num"],
                     f"{summary['bytes_per_s']:,.0f}", f"{summary['val']['bpb']:.4f}",
                     *["" if v is None else f"{v:.4f}" for v in views]])
    print(f"\n### Exact likelihood: bits per byte on the same {4 if cfg.quick else cfg.eval_windows} validation "
          f"windows (lower is better)\n")
    print(markdown(rows))
    for name in ("unmasked", "canonical"):
        share = noncanonical_share(cfg, run_model(cfg, name))
        result[name]["noncanonical_samples"] = share
        print(f"\n{name}: {share:.0%} of its samples (temperature 1, no top-k) are not canonical streams")
    return result


ABLATIONS = {   # run: (group, label, settings on top of config/cpu.py)
    "m1": ("merge size", "M=1 (plain)", ["--max_subtokens=1"]),
    "m2": ("merge size", "M=2", ["--max_subtokens=2"]),
    "m3": ("merge size", "M=3", ["--max_subtokens=3"]),
    "m4": ("merge size", "M=4", ["--max_subtokens=4"]),
    "m5": ("merge size", "M=5", ["--max_subtokens=5"]),
    "mean": ("hyper-encoder", "mean of the base embeddings", ["--hyper_encoder=mean"]),
    "mlp": ("hyper-encoder", "MLP over the slots side by side", ["--hyper_encoder=mlp"]),
    "digits": ("digits", "M=4, no_digit_merges=True", ["--no_digit_merges=True"]),
    "c256": ("codebook", "M=4, C=256", ["--max_codebook_size=256"]),
    "m1-seed2": ("seeds", "plain, seed 2", ["--max_subtokens=1", "--seed=2"]),
    "m1-seed3": ("seeds", "plain, seed 3", ["--max_subtokens=1", "--seed=3"]),
    "m4-seed2": ("seeds", "M=4, seed 2", ["--seed=2"]),
    "m4-seed3": ("seeds", "M=4, seed 3", ["--seed=3"]),
}


def digit_rich(cfg, n):
    """The n validation windows (train.py's block) whose text holds the most digits."""
    tok = Tokenizer()
    digits = np.array([sum(48 <= b <= 57 for b in t) for t in tok.token_bytes])   # digit bytes per base id
    val, block = np.asarray(bench.load_tokens("pycode", "val")), 32 if cfg.quick else 256
    per_window = digits[val[:len(val) // block * block].astype(np.int64)].reshape(-1, block).sum(1)
    return sorted(np.argsort(-per_window, kind="stable")[:n].tolist())


def ablations(cfg):
    """The paper's ablations at equal training time (--seconds a run): merge size, hyper-encoder,
    digits, seeds, codebook size; tables, and the curves of bits per byte against training time."""
    from train import estimate_loss
    seconds = [] if cfg.quick else [f"--max_seconds={cfg.seconds:g}", "--eval_interval=30"]   # ~6 points a curve
    runs = {name: train_run(cfg, name, *seconds, *args) for name, (_, _, args) in ABLATIONS.items()}
    bpb = {name: s["val"]["bpb"] for name, (s, _) in runs.items()}
    row = lambda name: [ABLATIONS[name][1], f"{bpb[name]:.4f}", f"{runs[name][0]['bytes_per_s']:,.0f}",
                        f"{runs[name][0]['val']['ratio']:.3f}", runs[name][0]["iter_num"]]
    head = ["run", "bits per byte", "bytes of text/s", "codes per base token", "steps"]
    print(f"\n### Ablations: {'2 steps (quick)' if cfg.quick else f'{cfg.seconds:g} s of training'} per run, "
          f"bits per byte on the same {4 if cfg.quick else cfg.eval_windows} validation windows\n")
    print(markdown([head] + [row(n) for n in ("m1", "m2", "m3", "m4", "m5")]))
    print()
    print(markdown([head] + [row(n) for n in ("m4", "mean", "mlp", "c256")]))
    # digits: the same text for both models, all windows and the windows richest in digits
    which = digit_rich(cfg, 2 if cfg.quick else 32)
    rich = {n: estimate_loss(m, windows_of(cfg, m, which), 16, nullcontext())["bpb"]
            for n, m in ((n, run_model(cfg, n)) for n in ("m1", "m4", "digits"))}
    print("\n" + markdown([["run", "bits per byte, all windows", f"the {len(which)} windows richest in digits"]] +
                          [[ABLATIONS[n][1], f"{bpb[n]:.4f}", f"{rich[n]:.4f}"] for n in ("m1", "m4", "digits")]))
    # seeds: the run-to-run noise of the main pair, and which differences exceed it
    seeds = {kind: [bpb[n] for n in names] for kind, names in
             (("plain", ("m1", "m1-seed2", "m1-seed3")), ("M=4", ("m4", "m4-seed2", "m4-seed3")))}
    spread = max(max(v) - min(v) for v in seeds.values())
    print("\n" + markdown([["model", "seeds 1337, 2, 3", "mean", "spread (max - min)"]] +
                          [[k, ", ".join(f"{x:.4f}" for x in v), f"{np.mean(v):.4f}", f"{max(v) - min(v):.4f}"]
                           for k, v in seeds.items()]))
    print(f"\nAgainst M=4 (seed 1337), differences larger than the seed spread ({spread:.4f}) are marked *:")
    for n in ("m1", "m2", "m3", "m5", "mean", "mlp", "c256", "digits"):
        d = bpb[n] - bpb["m4"]
        print(f"- {ABLATIONS[n][1]}: {d:+.4f}{' *' if abs(d) > spread else ''}")
    curves(cfg, {n: log for n, (_, log) in runs.items()})
    return {"bpb": bpb, "rich": rich, "seeds": seeds, "spread": spread}


def curves(cfg, logs):
    """Bits per byte against training seconds of every run: a CSV always, a PNG per group with
    matplotlib (an optional dependency)."""
    path = os.path.join(cfg.runs, "curves.csv")
    with open(path, "w") as f:
        f.write("group,run,train_seconds,bpb\n")
        for n, log in logs.items():
            for e in log["evals"]:
                f.write(f"{ABLATIONS[n][0]},{n},{e['train_seconds']:.1f},{e['bpb']:.4f}\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\ncurves: {path} (pip install matplotlib for the pictures)")
        return
    groups = {"main": ["m1", "m1-seed2", "m1-seed3", "m4", "m4-seed2", "m4-seed3"], "merge size": ["m1", "m2", "m3", "m4", "m5"],
              "hyper-encoder": ["m4", "mean", "mlp"], "digits and codebook": ["m4", "digits", "c256"]}
    for group, names in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in names:
            e = [x for x in logs[n]["evals"] if x["train_seconds"] > 0]   # step 0 (untrained) would squash the rest
            style = {}
            if group == "main":   # one colour per model, one line style per seed
                seed = n.partition("-")[2]
                style = dict(color="tab:blue" if n.startswith("m1") else "tab:red",
                             linestyle={"": "-", "seed2": "--", "seed3": ":"}[seed])
                label = f"{'plain' if n.startswith('m1') else 'zip2zip M=4'}, seed {seed[4:] or cfg.seed}"
            elif n == "m4":   # the reference run: name what the others change
                label = {"hyper-encoder": "M=4, transformer", "digits and codebook": "M=4, C=1024"}.get(group, "M=4")
            else:
                label = ABLATIONS[n][1]
            ax.plot([x["train_seconds"] for x in e], [x["bpb"] for x in e], marker=".", label=label, **style)
        ax.set(xlabel="training seconds", ylabel="validation bits per byte", title=f"{group} (CPU preset)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.runs, f"curves_{group.replace(' ', '_')}.png"), dpi=110)
        plt.close(fig)
    print(f"\ncurves: {path} and {cfg.runs}/curves_*.png")


def markdown(rows):
    """A markdown table: the first row is the header; numbers right-aligned."""
    right = [all(str(r[i]).replace(",", "").replace(".", "").lstrip("+-").isdigit() or r[i] == "" for r in rows[1:])
             for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "|".join("---:" if x else "---" for x in right) + "|"] + lines[1:])


def setup(argv):
    """(settings, data sets, checkpoints or None when none is given, device) from the command
    line, every one checked: GPT-2's ranks, the data (prepared first if missing), the checkpoints."""
    cfg = ReproduceConfig()
    out_dirs = cli.configure(cfg, argv, presets=False)
    ints = lambda text: all(x.isdigit() and int(x) > 0 for x in text.split(","))
    cli.check(cfg, ("window", cfg.window >= 0, "0 (whole data set) or more base tokens"),
              ("max_codebook_size", cfg.max_codebook_size >= 0, "0 or more"),
              ("codebook_sizes", ints(cfg.codebook_sizes), "sizes like 64,256,1024"),
              ("windows", ints(cfg.windows), "window lengths like 1024,4096"),
              ("max_tokens", cfg.max_tokens >= 0, "0 (all) or more"), ("eval_windows", cfg.eval_windows >= 1, "1 or more"),
              ("eval_batch_size", cfg.eval_batch_size >= 1, "1 or more"),
              ("decode_rounds", cfg.decode_rounds >= 1, "1 or more"), ("threads", cfg.threads >= 0, "0 or more"),
              ("seconds", cfg.seconds > 0, "more than 0"), ("beams", ints(cfg.beams), "beam widths like 1,4,16"))
    gpt2_bpe()   # GPT-2's ranks: missing or damaged, say so now, not after the first table
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg, data_sets(cfg), load_models(out_dirs, device) if out_dirs else None, device


def main(argv=None):
    with cli.one_line_errors():
        cfg, sets, models, device = setup(sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if cfg.likelihood or cfg.ablations:
        result = {"likelihood": likelihood(cfg) if cfg.likelihood else None,
                  "ablations": ablations(cfg) if cfg.ablations else None}
        print(f"\n({time.perf_counter() - t0:.0f} s)")
        return result
    ratios = token_efficiency(cfg, sets)
    bpb = bits_per_byte(cfg, models) if models is not None else {}   # None: no checkpoint given
    speed = None
    if cfg.decode:
        bcfg = bench.BenchConfig(decode_batches="1", rounds=cfg.decode_rounds)
        speed = bench.bench_decode(bcfg, device, Tokenizer(4, bcfg.max_codebook_size))["batch_1"]
        print(f"\n### Decoding speed (KV cache, replaying pycode val; {bcfg.n_layer} layers, {bcfg.n_embd} wide, "
              f"context {bcfg.block_size}, {device})\n")
        print("| batch | zip2zip bytes/s | plain bytes/s | ratio | ops per step, zip2zip / plain |\n|---:|---:|---:|---:|---:|")
        print(f"| 1 | {speed['zip2zip_bytes_per_s']:,.0f} | {speed['plain_bytes_per_s']:,.0f} | "
              f"{speed['ratio']:.2f}x | {speed['zip2zip_ops']} / {speed['plain_ops']} |")
    compare(ratios, bpb, speed)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
