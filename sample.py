"""
Sample from a trained zip2zip model, with its hypertokens marked.

    python sample.py --out_dir=out --start="def fibonacci(n):" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.py --temperature=0 --color=False

Each sample is printed, prompt included, with every hypertoken marked (alternating colours on a
terminal, [brackets] otherwise), then what compression bought: how many base tokens the
generated codes stand for, the length ratio codes / base tokens, the share of hypertokens, and
text bytes per second. A prompt longer than the context is fine: the decoder keeps the last
block_size codes and the whole codebook. An empty prompt starts from <|endoftext|>.
"""

import sys
import time
from dataclasses import dataclass

import torch

from cli import configure, load_checkpoint, show
from zip2zip import Tokenizer, lzw_decode, lzw_encode


@dataclass
class SampleConfig:
    out_dir: str = "out"          # train.py's out_dir (a folder holding ckpt.pt), or a checkpoint file
    start: str = "\n"             # the prompt; "FILE:path" reads it from a file; "": <|endoftext|> only
    num_samples: int = 3          # samples drawn one after the other
    max_new_tokens: int = 256     # codes per sample; on code each stands for about 2 base tokens
    temperature: float = 0.8      # < 1 sharpens the distribution, 0 is greedy
    top_k: int = 200              # sample among the k likeliest codes; 0: all of them
    seed: int = 1337              # same seed, checkpoint and settings: same samples
    device: str = "auto"          # "cpu", "cuda", "cuda:1", ...; auto: cuda when there is one
    color: object = None          # None: colour on a terminal only; True/False force it on or off


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[len("FILE:"):], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read the prompt file: {e}")


def main(argv=None):
    cfg = SampleConfig()
    try:
        extra = configure(cfg, sys.argv[1:] if argv is None else argv, presets=False)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if extra:
        raise SystemExit(f"error: unexpected argument {extra[0]!r} (options are --key=value)")
    if cfg.color not in (None, True, False):
        raise SystemExit(f"error: --color is True or False, not {cfg.color!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device}: CUDA is not available here")
    try:
        model, _ = load_checkpoint(cfg.out_dir, device)
        tok = Tokenizer.for_model(model.config)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    model.eval()
    color = sys.stdout.isatty() if cfg.color is None else cfg.color
    settings = (tok.vocab_size, tok.max_codebook_size, tok.max_subtokens, tok.disabled_ids)

    # Every training document follows an <|endoftext|>, so the prompt does too. It is a wall:
    # it makes no entry, so the codes after it decode (and are shown) exactly as on their own.
    ids = [tok.eot] + tok.encode_base(read_prompt(cfg.start))
    prompt = lzw_encode(ids, *settings)
    c = model.config
    print(f"model: {model.get_num_params() / 1e6:.1f}M parameters, M={c.max_subtokens}, "
          f"C={c.max_codebook_size}, context {c.block_size} codes; prompt: {len(ids) - 1} base tokens "
          f"in {len(prompt) - 1} codes")

    torch.manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        t0 = time.perf_counter()
        row = model.generate([prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k or None)[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        new = row[len(prompt):]                            # the generated codes
        base = lzw_decode(row, *settings)[len(ids):]       # the base tokens they stand for
        n_bytes, n_hyper = tok.n_bytes(base), sum(code >= tok.vocab_size for code in new)
        print(show(tok, row[1:], color))
        print(f"--- sample {i + 1}/{cfg.num_samples}: {len(new)} codes for {len(base)} base tokens "
              f"(length ratio {len(new) / max(len(base), 1):.2f}), {n_hyper / max(len(new), 1):.0%} "
              f"hypertokens, {n_bytes:,} bytes in {seconds:.2f} s = {n_bytes / seconds:,.0f} bytes/s")


if __name__ == "__main__":
    main()
