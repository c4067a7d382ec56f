"""
Training batches built in the background, and moved to the device.

The LZW codec is pure Python, so building a batch takes real CPU time: workers (processes, to
sidestep the GIL, or threads) build the next batches while the model trains, and measure how fast
they do it, so the log can say whether they keep up. Batch j is a function of (seed, rank, j)
alone (train.get_batch), so any number of workers of any kind, and a resumed run, see the same
batches in the same order.
"""

import ctypes
import ctypes.util
import dataclasses
import os
import queue
import signal
import threading
import time

import numpy as np
import torch

from zip2zip import HyperBatch

HYPER_FIELDS = tuple(f.name for f in dataclasses.fields(HyperBatch))


def _produce(out, stop, path, get_batch, job, worker, n_workers):
    """A loader worker: micro-batches first + worker, + n_workers, ... into the queue `out`, each
    with the seconds it took to build."""
    torch.set_num_threads(1)
    getattr(out, "cancel_join_thread", lambda: None)()   # a process may exit with batches queued
    parent = os.getppid()
    running = lambda: not stop.is_set() and os.getppid() == parent   # an orphan stops too
    data, j = np.memmap(path, dtype=np.uint16, mode="r"), job["first"] + worker
    try:
        while running():
            t0 = time.perf_counter()
            x, y, hyper, n = get_batch(data, job, j)
            item = (x.numpy(), y.numpy(), hyper and [getattr(hyper, f).numpy() for f in HYPER_FIELDS], n,
                    time.perf_counter() - t0)
            while running():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            j += n_workers
    except Exception as e:   # handed to the training loop, which raises it
        out.put(RuntimeError(f"batch worker {worker} failed at batch {j}: {type(e).__name__}: {e}"))


class Batches:
    """Micro-batches (x, y, hyper, n_bytes) from job["first"] on, in order, on the CPU.

    kind: "process", "thread" or "sync" (built on demand, in this thread). Worker w builds batches
    w, w + n, ... into its own queue. get_batch(data, job, j) builds batch j.
    """

    def __init__(self, path, job, kind, n_workers, get_batch):
        self.job, self.j, self.kind, self.get_batch, self.workers = job, job["first"], kind, get_batch, []
        self.data = np.memmap(path, dtype=np.uint16, mode="r")
        self.built = [0, 0.0]    # codes (targets), seconds of building them, since speed() was last read
        if kind == "sync":
            return
        import multiprocessing
        mp = multiprocessing.get_context("spawn")   # fork would copy torch's thread pools into the child
        make, Worker, self.stop = ((mp.Queue, mp.Process, mp.Event()) if kind == "process" else
                                   (queue.Queue, threading.Thread, threading.Event()))
        self.queues = [make(maxsize=4) for _ in range(n_workers)]
        self.workers = [Worker(target=_produce, args=(q, self.stop, path, get_batch, job, w, n_workers), daemon=True)
                        for w, q in enumerate(self.queues)]
        # Ctrl-C reaches every process of the terminal's group; the training loop decides what to
        # do about it. A process started while SIGINT is ignored keeps ignoring it (exec and
        # Python's start-up leave an ignored SIGINT alone), so workers print no tracebacks.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main and kind == "process" else None
        try:
            for w in self.workers:
                w.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def next(self):
        j, self.j = self.j, self.j + 1
        if self.kind == "sync":
            t0 = time.perf_counter()
            x, y, hyper, n = self.get_batch(self.data, self.job, j)
            self._count(y, time.perf_counter() - t0)
            return x, y, hyper, n
        w = j % len(self.workers)
        while True:
            try:
                item = self.queues[w].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.workers[w].is_alive():
                    raise RuntimeError(f"batch worker {w} died") from None
        if isinstance(item, Exception):
            raise item
        x, y, hyper, n, seconds = item
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        self._count(y, seconds)
        return x, y, hyper and HyperBatch(**{f: torch.from_numpy(a) for f, a in zip(HYPER_FIELDS, hyper)}), n

    def _count(self, y, seconds):
        self.built = [self.built[0] + int((y >= 0).sum()), self.built[1] + seconds]

    def speed(self):
        """Codes per second all workers together can build (each one's rate, measured in it, times
        their number), over the batches handed out since the last call."""
        codes, seconds = self.built
        self.built = [0, 0.0]
        return codes / seconds * max(1, len(self.workers)) if seconds > 0 else float("nan")

    def close(self):
        if self.workers:
            self.stop.set()
        for w in self.workers:
            w.join(timeout=2)
            if self.kind == "process" and w.is_alive():
                w.terminate()


def to_device(x, y, hyper, device):
    """A batch on the device. On CUDA through pinned (page-locked) memory, so that the copies are
    asynchronous: the GPU keeps computing while they run. Every HyperBatch field goes."""
    pin = str(device).startswith("cuda")
    move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=True)
    return move(x), move(y), hyper and HyperBatch(**{f: move(getattr(hyper, f)) for f in HYPER_FIELDS})


def _malloc_trim():
    """glibc's malloc_trim, or None off glibc (macOS, Windows, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory():
    """Subtle: the hypertoken tensors change size with every batch, and on the CPU glibc keeps
    the freed memory of such tensors around: a CPU run grew by ~20 MB a step (8 GB in the CPU
    preset) without this; with it, memory stays flat at no measurable cost in speed."""
    if _TRIM is not None:
        _TRIM(0)
