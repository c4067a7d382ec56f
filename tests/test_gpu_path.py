"""What a GPU run needs from train.py that a CPU can check: the printed torchrun commands pass their
own checks, DDP takes the device it is given, the clock waits for the device where a figure is
reported, the loader's default workers fit the CPUs the job may use, and the torch floor is
past the CUDA grid limit older versions hit."""
import json
import os
import re
import shlex
import time
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch

import train
from lib import loader
from test_train import data_dir, tiny, tok  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed_torchrun_commands():
    """The arguments after train.py of every torchrun line in README.md and train.py's docstring."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read() + "\n" + train.__doc__
    commands = [shlex.split(line, comments=True) for line in text.splitlines() if line.strip().startswith("torchrun ")]
    return [cmd[cmd.index("train.py") + 1:] for cmd in commands]


def test_the_printed_torchrun_commands_pass_their_checks():
    commands = printed_torchrun_commands()
    assert len(commands) >= 2
    for args in commands:
        for world in (1, 2, 4, 8):
            for cuda in (True, False):      # the GPU defaults, and config/cpu.py first
                train.read_config(args, cuda, world)
    with pytest.raises(ValueError, match="^--gradient_accumulation_steps=2: expected a positive multiple or divisor "
                                         "of the 3 processes$"):
        train.read_config([], True, 3)


@pytest.mark.parametrize("total,world,share", [(2, 1, 2), (2, 2, 1), (2, 8, 1), (8, 4, 2)])
def test_ddp_takes_the_device_it_is_given_and_shares_the_step(tmp_path, monkeypatch, total, world, share):
    # on a machine with CUDA, --device=cpu means the CPU and gloo (a one-GPU machine has no cuda:1)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("backend", backend)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for key, value in dict(RANK=world - 1, LOCAL_RANK=world - 1, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world).items():
        monkeypatch.setenv(key, str(value))
    with ExitStack() as held:
        env = train.setup(["--device=cpu", f"--out_dir={tmp_path}", f"--gradient_accumulation_steps={total}"], held)
    assert env.device == "cpu" and env.device_type == "cpu" and calls == [("backend", "gloo")]
    assert env.accum == share


def test_the_clock_waits_for_the_device_on_the_steps_it_reports(data_dir, tmp_path, monkeypatch):  # noqa: F811
    # a clock that only moves when the device is waited for (a GPU's queued work takes time that
    # the host does not see): each reported step's time must hold that wait
    now = [0.0]
    monkeypatch.setattr(train, "sync", lambda device: now.__setitem__(0, now[0] + 1.0))
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: now[0], process_time=time.process_time))
    # and, on a node of 200 CPUs, the loader starts its default workers, not one per CPU
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)), raising=False)
    started, batches = [], loader.Batches
    monkeypatch.setattr(loader, "Batches", lambda *a: started.append(a[3]) or batches(*a))
    train.main(tiny(data_dir, tmp_path, "--max_iters=5", "--log_interval=2", "--eval_interval=4", "--loader=thread",
                    "--num_workers=0"))
    assert started == [loader.MAX_WORKERS]
    log = json.loads((tmp_path / "log.json").read_text())
    # synced: the first step (logged), 2 and 4 (logged; 4 also evaluated after), 5 (the last)
    assert [(e["iter"], e["train_seconds"]) for e in log["train"]] == [(1, 1.0), (2, 2.0), (4, 3.0)]
    assert [(e["iter"], e["train_seconds"]) for e in log["evals"]] == [(0, 0.0), (4, 3.0), (5, 4.0)]


def test_the_loader_starts_a_few_workers_on_the_cpus_it_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 256)                      # the node
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)   # the job's share
    assert loader.usable_cpus() == 5
    assert [loader.default_workers(n) for n in (1, 2)] == [3, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)))
    assert loader.default_workers(1) == loader.default_workers(8) == loader.MAX_WORKERS
    monkeypatch.delattr(os, "sched_getaffinity")                         # macOS, Windows: no affinity
    assert loader.usable_cpus() == 256


def test_the_torch_floor_is_past_the_cuda_grid_limit():
    # torch < 2.8 can exceed a CUDA grid limit in the hyper-encoder's attention above batch_size ~70
    floor = re.search(r"^torch>=(\d+)\.(\d+)", open(os.path.join(REPO, "requirements.txt")).read(), re.M).groups()
    assert tuple(map(int, floor)) >= (2, 8)
    assert f"torch >= {'.'.join(floor)}" in open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
