"""
What train.py prints: the model it trains, the lines of the logged steps (losses, speed, time
elapsed and to the end; the losses also go into the log) and of the evaluations, and, when a run
ends, what was done and how to go on, then a sample; and the figures train.main returns.
README.md ("What you see") and docs/running.md explain the fields.
"""

import math
import os
import sys

import torch

import fastgen
from lib import cli, outdir
from lib.loader import EOT
from lib.meter import eta_seconds, hms


def n_params(model, non_embedding=True):
    """The model's parameters; non_embedding=True leaves out the position embeddings (nanoGPT's count)."""
    n = sum(p.numel() for p in model.parameters())
    return n - model.transformer.wpe.weight.numel() if non_embedding else n


def model(env, model):
    """The line that opens a run: parameters (and how many train: LoRA freezes the rest), M and
    C, codes per step (ranks x micro-batches x rows x codes), device and dtype."""
    cfg, n_trained = env.cfg, sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {n_params(model, False) / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), "
          f"M={cfg.max_subtokens}, C={cfg.max_codebook_size}; "
          f"{env.world * env.accum * cfg.batch_size * cfg.block_size:,} codes per step ({env.world} x {env.accum} "
          f"x {cfg.batch_size} x {cfg.block_size}); {env.device}, {env.dtype}")


def evaluation(it, m, beam):
    """The line of an evaluation (train.estimate_loss's figures m at step it)."""
    views = f" (multi-view, beam {beam}: {m['bpb_multiview']:.4f})" if beam else ""
    print(f"step {it}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits per byte{views}, "
          f"{m['ratio']:.3f} codes per base token ({m['bytes_per_code']:.2f} bytes per code)")


def eta(env, run, meter, now):
    """", ETA h:mm:ss" after the first step of this process, which warms up (compilation, the first
    batches) and would make the first ETAs many times too long: the pace is timed from the steps
    after it, with the evaluations among them counted apart (lib.meter.eta_seconds)."""
    cfg, it = env.cfg, run.iter_num
    if it == run.start_iter + 1:
        run.first_done = now, meter.total["seconds"], run.eval_seconds
        return ""
    n = it - run.start_iter - 1      # steps timed
    step_wall = (now - run.first_done[0] - (run.eval_seconds - run.first_done[2])) / n
    step_train = (meter.total["seconds"] - run.first_done[1]) / n
    left = eta_seconds(it, cfg.max_iters, cfg.max_seconds, run.train_seconds, cfg.eval_interval, step_wall,
                       step_train, run.last_eval)
    return f", ETA {hms(left)}"


def progress(env, run, losses, lr, dt, meter, batches, now):
    """A logged step: the mean losses since the last log line go into run.history and the log; on
    rank 0 a line with them, the LR, this step's time, the speed since the last line, time since the
    start (evaluations included) and to the end. SystemExit if the training loss is not finite."""
    it = run.iter_num
    n = it - (run.history[-1][0] if run.history else run.start_iter)
    lm, recon = (float(losses[k]) / n for k in ("lm", "recon"))
    if not math.isfinite(lm):   # training data is canonical: no target may ever be masked
        raise SystemExit(f"error: step {it}: the training loss is {lm}: a target lies outside the "
                         f"model's output vocabulary (masked -inf); the batches are not the model's own codes")
    run.history.append((it, lm, recon))
    run.log["train"].append({"iter": it, "train_seconds": run.train_seconds, "loss": lm, "recon": recon})
    if not env.master:
        return
    built = env.cfg.loader != "sync" and batches.speed()      # codes/s the workers can build
    print(f"iter {it}: loss {lm:.4f}" + (f", recon {recon:.4f}" if env.mconf.has_hypertokens else "") +
          f", lr {lr:.2e}, {1000 * dt:.0f} ms, {meter.report(built, env.world)}; "
          f"{hms(now - run.t_start)} elapsed{eta(env, run, meter, now)}")


def summary(env, run, meter):
    """What the run did, on rank 0: stopped (saved or not, and the command that resumes), trained
    (how fast, the last evaluation), or found nothing to train (and how to train longer)."""
    cfg, ckpt_path, it, total = env.cfg, env.ckpt_path, run.iter_num, meter.total
    if env.writes and run.stop:
        print(f"stopped at step {it}, saved in {ckpt_path}; to continue: "
              f"{outdir.resume_command(cfg.out_dir, env.world)}" if run.saved_iter == it and os.path.exists(ckpt_path)
              else f"stopped at step {it}: nothing to save")
    elif env.master and total["seconds"] > 0:
        codes_s, bytes_s = (total[k] / total["seconds"] for k in ("codes", "bytes"))
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


def sample(env, run):
    """sample_tokens codes generated from <|endoftext|>, shown as text with the hypertokens marked."""
    cfg = env.cfg
    run.interrupt.restore()             # Ctrl-C now just ends the process: all is saved
    torch.manual_seed(cfg.seed)
    run.raw_model.eval()
    with env.ctx:
        codes = fastgen.generate(run.raw_model, [[EOT]], cfg.sample_tokens, temperature=0.8, top_k=200,
                                 compile=cfg.compile)[0]
    print(f"sample ({cfg.sample_tokens} codes):")
    print(cli.show(env.tokenizer, codes[1:], color=sys.stdout.isatty()))


def figures(run, meter):
    """What train.main returns, for tests and evals/reproduce.py: the curve, the last evaluation,
    the step reached, the training time, and the speed of this process's steps."""
    total = meter.total
    return {"history": run.history, "val": run.metrics, "iter_num": run.iter_num, "train_seconds": run.train_seconds,
            "codes_per_s": total["codes"] / max(total["seconds"], 1e-9),
            "bytes_per_s": total["bytes"] / max(total["seconds"], 1e-9), "cpu_seconds": total["cpu"]}
