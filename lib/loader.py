"""
The data of training: token files checked, windows of base tokens compressed into batches (and
into the fixed validation windows), batches built in the background and moved to the device.

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

from lib import cli
from lib.checks import base_ids
from zip2zip import LZW, HyperBatch, hyper_batch, lzw_encode

EOT = 50256  # <|endoftext|>: a wall between documents, never merged, 0 bytes of text
HYPER_FIELDS = tuple(f.name for f in dataclasses.fields(HyperBatch))

# -----------------------------------------------------------------------------
# Token files, training batches, validation windows


def lzw_encode_window(ids, start, n_codes, vocab_size, max_codebook_size, max_subtokens,
                      disabled_ids=()):
    """The first n_codes codes of the canonical encoding of ids[start:], fresh codebook.

    Returns (codes, n_base): n_base is how many base ids the codes stand for, so the next
    window can start at start + n_base and no text is lost between windows. Fewer codes come
    back only where the input runs out.
    """
    lzw, out, pos = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), [], start
    while len(out) < n_codes and pos < len(ids):
        # Each code covers at least one base id, so this many more never overshoots by much.
        chunk = base_ids(ids[pos:pos + n_codes - len(out)], vocab_size, pos)
        lzw.feed(chunk, out)
        pos += len(chunk)
    if pos >= len(ids):
        lzw.flush(out)
    codes = out[:n_codes]
    return codes, sum(len(lzw.content(c)) for c in codes)


def check_tokens(path, vocab_size):
    """ValueError unless the file holds uint16 base ids < vocab_size. One pass, in chunks (a file
    may be larger than memory) and fast: a bad id would otherwise fail only when a batch happens
    to draw it, perhaps hours in."""
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        raise ValueError(f"{path}: {size} bytes; expected uint16 token ids (a positive, even size)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    for i in range(0, len(data), 1 << 24):
        bad = np.flatnonzero(data[i:i + (1 << 24)] >= vocab_size)
        if len(bad):
            raise ValueError(f"{path}: token {i + bad[0]} is {data[i + bad[0]]}, not a base id (< {vocab_size})")


def data_folder(dataset, repo, prepare=True):
    """The folder of --dataset: data/<name>/ of the repository, or the path given. A shipped
    dataset that is missing is prepared first when `prepare` (rank 0: the others wait for it)."""
    folder = dataset if os.sep in dataset else os.path.join(repo, "data", dataset)
    if prepare and os.sep not in dataset and os.path.isfile(os.path.join(folder, "prepare.py")) \
            and not os.path.exists(os.path.join(folder, "meta.json")):
        print(f"data/{dataset} is missing or incomplete: preparing it first")
        __import__(f"data.{dataset}.prepare", fromlist=["prepare"]).prepare()
    return folder


def data_files(dataset, folder, block_size, max_subtokens, vocab_size):
    """(train.bin, val.bin) of a dataset's folder: ValueError unless both are there and hold base
    ids < vocab_size, and train.bin holds a window: block_size + 1 codes, up to M base ids each."""
    paths = tuple(os.path.join(folder, f"{s}.bin") for s in ("train", "val"))
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"--dataset={dataset}: no {p}")
        check_tokens(p, vocab_size)
    n_train, need = len(np.memmap(paths[0], dtype=np.uint16, mode="r")), max_subtokens * (block_size + 1)
    if n_train < need:
        raise ValueError(f"{paths[0]} holds {n_train} tokens; a window of {block_size + 1} codes may need {need}")
    return paths


def open_data(env, repo):
    """(train.bin's path, the fixed validation windows) of a run (train.py's env: settings, ranks,
    model config, tokenizer), the dataset prepared first by rank 0 if a shipped one is missing."""
    cfg = env.cfg
    folder = data_folder(cfg.dataset, repo, prepare=env.master)
    if env.ddp:
        torch.distributed.barrier()
    with cli.one_line_errors():
        train_path, val_path = data_files(cfg.dataset, folder, cfg.block_size, cfg.max_subtokens,
                                          env.mconf.vocab_size)
        windows = eval_windows(np.memmap(val_path, dtype=np.uint16, mode="r"), cfg.eval_windows,
                               cfg.block_size, env.mconf, env.tokenizer.byte_lengths)
    return train_path, windows


def build_batch(data, starts, block_size, model_config, byte_lengths):
    """Compress the window at each start (fresh codebook) until block_size + 1 codes came out.

    data: uint16 base ids; byte_lengths: UTF-8 bytes per base id. Returns x, y (B, block_size)
    int64 with y = x shifted, the HyperBatch of x (None if plain), and n_bytes of text the targets
    stand for. Example (M=4): [a, b, a, b, a, ..] -> codes [a, b, V, a, ..]: x = [a, b, V, ..],
    y = [b, V, a, ..]. A window that meets the end of the data is padded (x: EOT, y: -1, ignored).
    """
    c = model_config
    pad = EOT if EOT in c.disabled_ids else 0
    xs, ys, n_bytes = [], [], 0
    for s in map(int, starts):
        codes, n_base = lzw_encode_window(data, s, block_size + 1, c.vocab_size, c.max_codebook_size,
                                          c.max_subtokens, c.disabled_ids)
        if len(codes) < 2:
            raise ValueError(f"window at {s}: fewer than 2 base tokens left in data of length {len(data)}")
        fill = block_size + 1 - len(codes)
        xs.append(codes[:-1] + [pad] * fill)
        ys.append(codes[1:] + [-1] * fill)
        # a fresh codebook is empty, so the first code is the base id data[s]; targets cover the rest
        n_bytes += int(byte_lengths[data[s + 1:s + n_base]].sum())
    hyper = hyper_batch(xs, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids) if c.has_hypertokens else None
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long), hyper, n_bytes


def eval_windows(val, n_windows, block_size, model_config, byte_lengths, which=None):
    """The fixed validation windows, the same text for every model of this block_size.

    val is cut into consecutive windows of block_size base tokens (so a plain model fits them)
    and n_windows of them, spread evenly, are kept (or the windows numbered `which`). Each gets an
    EOT in front (a wall that acts as a beginning of text) and a fresh codebook. Returns
    [(codes, n_base, n_bytes)].
    """
    c, n_total = model_config, len(val) // block_size
    if n_total < n_windows:
        raise ValueError(f"--eval_windows={n_windows}: val.bin holds only {n_total} windows of {block_size} tokens")
    out = []
    for i in np.linspace(0, n_total - 1, n_windows).round().astype(int) if which is None else which:
        ids = [EOT] + val[i * block_size:(i + 1) * block_size].tolist()
        codes = lzw_encode(ids, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
        out.append((codes, block_size, int(byte_lengths[ids].sum())))
    return out

# -----------------------------------------------------------------------------
# Background workers

# Workers a rank starts by default, at most: each is a process of about 300 MB, and about 3 keep up
# with one H100 on the default GPU job (a worker builds ~384k codes/s; the steps use ~1.06M at 40%
# MFU). A faster job that needs more says so in its log ("loader 0.8x"): then set --num_workers.
MAX_WORKERS = 4


def usable_cpus():
    """The CPUs this process may run on: a job's share of the node (its affinity), not the node's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(local_world):
    """Workers per rank when --num_workers=0: the usable CPUs shared by this machine's ranks, less 2
    left to the training process, at least 1 and at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, usable_cpus() // local_world - 2))


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
