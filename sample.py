"""
Sample from a trained zip2zip model, with its hypertokens marked.

    python sample.py --out_dir=out --start="def fibonacci(n):" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.py --temperature=0 --color=False

The prompt is printed once, then each sample's continuation in a block of its own, with every
hypertoken marked (alternating colours on a terminal, otherwise a pair of brackets such as ⟦ ⟧
that the text does not contain; a legend line says which), then what compression bought: how
many base tokens the generated codes stand for, the length ratio codes / base tokens, the share
of hypertokens, and text bytes per second. A prompt longer than the context is fine: the decoder
keeps the last block_size codes and the whole codebook. An empty prompt starts from <|endoftext|>.
"""

import sys
import time
from dataclasses import dataclass, field

import torch

import fastgen
from lib import cli, report
from zip2zip import lzw_decode, lzw_encode


@dataclass
class SampleConfig:
    out_dir: str = field(default_factory=cli.train_out_dir)   # train.py's out_dir (a folder holding ckpt.pt) or
                                  # a checkpoint file; by default where `python train.py` writes on this machine
    start: str = "\n"             # the prompt; "FILE:path" reads it from a file; "": <|endoftext|> only
    num_samples: int = 3          # samples drawn one after the other
    max_new_tokens: int = 256     # codes per sample; on code each stands for about 2 base tokens
    temperature: float = 0.8      # < 1 sharpens the distribution, 0 is greedy
    top_k: int = 200              # sample among the k likeliest codes; 0: all of them
    seed: int = 1337              # same seed, checkpoint and settings: same samples
    device: str = "auto"          # "cpu", "cuda", "cuda:1", ...; auto: cuda when there is one
    dtype: str = "auto"           # float32, bfloat16 or float16 (autocast, as nanoGPT); auto: bfloat16
                                  # on a GPU that has it, else float32 (the KV cache follows it)
    compile: bool = False         # compile the decoding step once (a CUDA graph per step on a GPU);
                                  # the first sample pays for the compilation
    color: object = None          # None: colour on a terminal only; True/False force it on or off


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--start=FILE:{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--start=FILE:{path}: cannot read the prompt file ({e.strerror})") from None


def setup(argv):
    """(settings, device, model, tokenizer, prompt text) from the command line, every one checked."""
    cfg = SampleConfig()
    cli.configure(cfg, argv, presets=False, positional=False)
    cli.check(cfg, ("num_samples", cfg.num_samples >= 0, "0 or more"),
              ("max_new_tokens", cfg.max_new_tokens >= 0, "0 or more"),
              ("temperature", 0 <= cfg.temperature < float("inf"), "0 (greedy) or more, and finite"),
              ("top_k", cfg.top_k >= 0, "0 (all codes) or more"),
              ("color", cfg.color in (None, True, False), "True or False"),
              ("dtype", cfg.dtype in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"))
    device = cli.device(cfg.device)
    text = read_prompt(cfg.start)
    model, _ = cli.load_checkpoint(cfg.out_dir, device)
    return cfg, device, model, cli.tokenizer_for(model.config), text


def main(argv=None):
    with cli.one_line_errors():
        cfg, device, model, tok, text = setup(sys.argv[1:] if argv is None else argv)
    model.eval()
    _, ctx = cli.autocast(cfg.dtype, device)
    color = sys.stdout.isatty() if cfg.color is None else cfg.color
    settings = (tok.vocab_size, tok.max_codebook_size, tok.max_subtokens, tok.disabled_ids)

    # Every training document follows an <|endoftext|>, so the prompt does too. It is a wall:
    # it makes no entry, so the codes after it decode (and are shown) exactly as on their own.
    ids = [tok.eot] + tok.encode_base(text)
    prompt = lzw_encode(ids, *settings)
    c = model.config
    print(f"model: {report.n_params(model) / 1e6:.1f}M parameters, M={c.max_subtokens}, "
          f"C={c.max_codebook_size}, context {c.block_size} codes; prompt: {len(ids) - 1} base tokens "
          f"in {len(prompt) - 1} codes")
    if len(prompt) > 1:   # the prompt once, apart from what the model writes after it
        print(f"=== prompt ===\n{cli.show(tok, prompt[1:], color)}")

    torch.manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        t0 = time.perf_counter()
        with ctx:
            row = fastgen.generate(model, [prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.compile)[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        new = row[len(prompt):]                            # the generated codes
        base = lzw_decode(row, *settings)[len(ids):]       # the base tokens they stand for
        n_bytes, n_hyper = tok.n_bytes(base), sum(code >= tok.vocab_size for code in new)
        # the continuation alone, decoded with the codebook the prompt built
        print(f"=== sample {i + 1}/{cfg.num_samples} ===\n{cli.show(tok, row[1:], color, len(prompt) - 1)}")
        print(f"--- sample {i + 1}/{cfg.num_samples}: {len(new)} codes for {len(base)} base tokens "
              f"(length ratio {len(new) / max(len(base), 1):.2f}), {n_hyper / max(len(new), 1):.0%} "
              f"hypertokens, {n_bytes:,} bytes in {seconds:.2f} s = {n_bytes / max(seconds, 1e-9):,.0f} bytes/s")


if __name__ == "__main__":
    main()
