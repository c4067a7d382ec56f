"""
The paper's headline measurements at small scale, on a CPU, printed as markdown tables.

    python reproduce.py                             # token efficiency and decoding speed (~5 min)
    python reproduce.py out-cpu out-plain-cpu       # and bits per byte of train.py checkpoints

1. Token efficiency (the paper's Table 2 and merge-size ablation): length ratio codes / base
   tokens and bytes per token before and after, on code (pycode val) and English prose (pydoc
   topics: prose val + train), for M = 1..5; then codebook size against window length at M = 4.
2. Bits per byte of each checkpoint given, on the same fixed validation windows (train.py's
   eval_windows and estimate_loss): the fair yardstick between a plain and a zip2zip model.
3. Decoding speed, zip2zip against plain, at batch 1 (bench.py's decoding benchmark).
Every figure is measured by this run; the paper's are quoted beside them.
"""

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import bench
import cli
from efficiency import compression_stats
from zip2zip import Tokenizer, gpt2_bpe

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
    threads: int = 0               # torch CPU threads; 0: torch's default


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
            models.append((path, model, ckpt, Tokenizer.for_model(model.config)))
        except (FileNotFoundError, ValueError) as e:
            print(f"skipped {path}: {e}")
    return models


def bits_per_byte(cfg, models):
    """Bits per byte of each checkpoint on the same validation text (train.py's fixed windows)."""
    from train import estimate_loss, eval_windows
    print("\n### Bits per byte on fixed validation windows (the same text for every model)\n")
    if not models:
        print("no checkpoints: train them first (`python train.py`, `python train.py config/plain_cpu.py`), "
              "then `python reproduce.py out-cpu out-plain-cpu`")
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
        print(f"| {path} | {model.config.max_subtokens} | {model.get_num_params() / 1e6:.1f}M | {steps} | "
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
              ("decode_rounds", cfg.decode_rounds >= 1, "1 or more"), ("threads", cfg.threads >= 0, "0 or more"))
    gpt2_bpe()   # GPT-2's ranks: missing or damaged, say so now, not after the first table
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg, data_sets(cfg), load_models(out_dirs, device) if out_dirs else None, device


def main(argv=None):
    with cli.one_line_errors():
        cfg, sets, models, device = setup(sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
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
