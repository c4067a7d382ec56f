"""
The processes torchrun starts (nanoGPT's DDP set-up): which one this is, the process group it
joins on the device --device names, and how it computes there (dtype, autocast, its share of a step).
"""

import os
from types import SimpleNamespace

import torch

from lib import cli, loader


def ranks():
    """ddp (launched by torchrun?), rank, local_rank, world, local_world, master: one process of
    one when not launched by torchrun."""
    env = SimpleNamespace(ddp=int(os.environ.get("RANK", -1)) != -1)
    env.rank, env.local_rank, world = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    env.world, env.local_world = max(world, 1), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    env.master = env.rank == 0
    return env


def start(device, local_rank, local_world):
    """Join the process group as --device says: one GPU per process (NCCL), or the CPU (gloo) with
    the machine's cores shared between its processes. Returns this process's device."""
    gpu = device.startswith("cuda")
    device = f"cuda:{local_rank}" if gpu else device
    torch.distributed.init_process_group(backend="nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, loader.usable_cpus() // local_world))
    return device


def place(env, cfg):
    """Set env.device (this process's, as --device says), device_type, dtype and ctx (the autocast
    context to compute in: lib/cli.autocast), and accum, this rank's micro-batches per step."""
    env.device = cli.device(cfg.device)
    if env.ddp:   # as --device says: one GPU per process (NCCL), or the CPU (gloo)
        env.device = start(env.device, env.local_rank, env.local_world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # each rank's share of the step's micro-batches; with more ranks than micro-batches, one each
    # (the step grows: the "codes per step" line says by how much), so that one command runs on 1 to 8 GPUs
    env.accum = max(1, cfg.gradient_accumulation_steps // env.world)
    env.device_type = "cuda" if env.device.startswith("cuda") else "cpu"
    env.dtype, env.ctx = cli.autocast(cfg.dtype, env.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
