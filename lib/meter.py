"""
How fast a training run goes: model FLOPs of a batch (nanoGPT's estimate_mfu, plus what zip2zip
adds), the counts behind train.py's log lines, and model FLOPs utilisation against the GPU's peak.
"""

import math

import torch

# dense bf16 FLOP/s of one GPU (NVIDIA's datasheets), by a part of torch.cuda.get_device_name; first match wins
BF16_PEAK = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def flops_per_batch(model, B, T, hyper):
    """Model FLOPs of one forward and backward pass over a (B, T) batch with HyperBatch `hyper`.

    Per code: 6 per weight of the blocks and the output layer (2 forward, 4 backward), 12 L d T for
    attention, 6 d K for the K hypertoken logits. Per unique hypertoken, in each hyper-encoder:
    6 per weight per slot (its MLP and output projection: once), attention over the M slots, the
    mean of the base embeddings; and the reconstruction head's M slots of d x d then d x V.
    Frozen weights (LoRA) are counted as trained, as nanoGPT does. Tested against torch's FLOP
    counter, for every hyper-encoder."""
    c, d, M = model.config, model.config.n_embd, model.config.max_subtokens
    K = hyper.entry_index.size(1) if hyper is not None else 0
    trunk = sum(p.numel() for p in model.transformer.h.parameters()) + c.vocab_size * d
    flops = (6 * trunk + 12 * c.n_layer * d * T + 6 * d * K) * B * T
    if hyper is not None:
        U, encoders = hyper.contents.size(0), {model.hyper_in, model.hyper_out}
        # a transformer's layers run on each of the M slots; the MLP and the output projection once
        weights = sum(p.numel() * (0 if n == "slot_pos" else 1 if n.startswith(("proj.", "mlp.")) else M)
                      for e in encoders for n, p in e.named_parameters())
        attention = sum(e.kind == "transformer" for e in encoders) * 12 * c.hyper_n_layer * c.hyper_width * M * M
        mean = len(encoders) * 4 * M * d      # the mean of the base embeddings, and its gradient
        flops += U * (6 * weights + attention + mean)
        if c.recon_lambda > 0:
            flops += 6 * min(U, c.recon_max_entries) * M * (d * d + d * c.vocab_size)
    return flops


def sync(device):
    """Wait for the work queued on the device: a GPU runs behind the host, so a clock read without
    this times only the launches, and speed and MFU come out too high."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    elif str(device).startswith("mps"):
        torch.mps.synchronize()


def eta_seconds(it, max_iters, max_seconds, train_seconds, eval_interval, step_wall, step_train, eval_seconds):
    """Seconds until a run that has taken `it` steps ends: the steps left at the pace of those so
    far, and the evaluations still to come (the one at step `it` if it is due, every eval_interval
    steps after it, one at the end) at `eval_seconds` each. step_wall: seconds a step takes,
    evaluations apart; step_train: its training time, which max_seconds counts. Example: 10 steps
    of 100 taken, 1 s a step, an evaluation every 25 steps, 10 s each:
    eta_seconds(10, 100, 0, 0, 25, 1, 1, 10) = 90 + 4 x 10 (steps 25, 50, 75, 100) = 130."""
    steps = max_iters - it
    if max_seconds > 0:
        steps = min(steps, math.ceil(max(max_seconds - train_seconds, 0) / max(step_train, 1e-9)))
    end = it + steps
    evals = end // eval_interval - (it - 1) // eval_interval + (end % eval_interval != 0)
    return steps * step_wall + evals * eval_seconds


def hms(seconds):
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Meter:
    """What the training steps did, since the last log line and in total: codes and bytes of text
    (all ranks), seconds of steps, model FLOPs (this rank's), CPU seconds (this process's)."""

    def __init__(self, device):
        cuda = str(device).startswith("cuda")
        name = torch.cuda.get_device_name(device) if cuda else ""
        self.peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
        self.unit = (1e12, "TFLOP/s") if cuda else (1e9, "GFLOP/s")
        self.since, self.total = (dict.fromkeys(("codes", "bytes", "seconds", "flops", "cpu"), 0) for _ in "12")

    def add(self, **counts):
        for acc in (self.since, self.total):
            for k, v in counts.items():
                acc[k] += v

    def report(self, codes_built=None, world=1):
        """Since the last report: codes/s, bytes/s, model FLOP/s (on a GPU of BF16_PEAK also MFU,
        against the bf16 peak whatever the dtype); given the codes/s one rank's loader can build, how
        many times what the steps use (below 1x the codec holds training back: more --num_workers,
        if there are cores)."""
        s, self.since = self.since, dict.fromkeys(self.since, 0)
        scale, unit = self.unit
        flops = s["flops"] / s["seconds"]
        return (f"{s['codes'] / s['seconds']:,.0f} codes/s, {s['bytes'] / s['seconds']:,.0f} bytes/s, "
                f"{flops / scale:,.1f} {unit}" + (f" (MFU {flops / self.peak:.1%})" if self.peak else "") +
                (f", loader {codes_built * world * s['seconds'] / s['codes']:.1f}x" if codes_built else ""))
