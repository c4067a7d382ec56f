"""
The processes torchrun starts (nanoGPT's DDP set-up): which one this is, and the process group it
joins on the device --device names.
"""

import os
from types import SimpleNamespace

import torch

from lib import loader


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
