"""
What a training run keeps in its out_dir, how it writes it, and how it stops with its work saved:

    ckpt.pt     the checkpoint: model, optimizer, counters, the run's settings (torch.save of plain
                tensors, numbers, strings, lists, tuples and dicts: loads with weights_only=True)
    log.json    the run's settings and curves, for plots (format below)
    train.lock  held by the one training that writes here (removed when it ends)

Both files are replaced atomically, so a crash, a kill or a full disk at any moment leaves the
previous version whole; a reader never sees half a file. Ctrl-C stops a run after its current
step, which train.py then saves; resume_command is how to go on.
"""

import dataclasses
import json
import os
import shlex
import signal
import tempfile
import threading
import time
from contextlib import contextmanager

import torch

from lib import cli

try:
    import fcntl
except ImportError:   # Windows: no advisory locks here, so nothing stops two runs
    fcntl = None


@contextmanager
def lock(out_dir):
    """Create out_dir if needed and hold out_dir/train.lock while in the `with` block; ValueError
    if another training holds it, or if out_dir cannot be written (found now, not at the first
    save). The lock is flock's: the kernel drops it when its process dies, however it dies, so a
    killed run leaves a train.lock file behind but never a lock that blocks the next run. A run
    that ends otherwise (done, Ctrl-C, an error) removes the file as it leaves."""
    path = os.path.join(out_dir, "train.lock")
    while True:
        try:
            os.makedirs(out_dir, exist_ok=True)
            f = open(path, "a+")
        except OSError as e:
            raise ValueError(f"--out_dir={out_dir}: cannot write there ({e.strerror})") from None
        if fcntl is None:
            break
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ValueError(f"--out_dir={out_dir} is in use by another training (process {holder}): "
                             f"wait for it to end, or choose another --out_dir") from None
        # subtle: a run that ends removes the file while it holds the lock; if that happened between
        # our open and our flock, we hold a file no longer in the folder, which nobody else would see
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            break
        f.close()
    if fcntl is not None:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")   # for the message above
        f.flush()
    try:
        yield f
    finally:
        try:
            os.remove(path)       # still held: a run starting now waits for nothing, and finds no stale file
        except OSError:
            pass
        f.close()


def atomic_write(path, write):
    """Replace `path` with what write(f) writes to a binary file f, atomically: a temporary file of
    a unique name in the same folder (two writers never share one), synced to disk, renamed over
    the old file; then the rename itself is synced. A failure at any point leaves the old file."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt, out_dir):
    """out_dir/ckpt.pt, atomically."""
    atomic_write(os.path.join(out_dir, "ckpt.pt"), lambda f: torch.save(ckpt, f))


# log.json, rewritten (atomically) at every evaluation; a resumed run continues it:
#   {"config": {...TrainConfig's fields...},
#    "evals": [{"iter": 250, "train_seconds": 61.2, "loss": 2.91, "bpb": 1.52, "ratio": 0.45,
#               "bytes_per_code": 7.9}, ...],        # validation, on the fixed windows
#    "train": [{"iter": 10, "train_seconds": 2.4, "loss": 7.2, "recon": 3.1}, ...]}
# train_seconds counts the time spent in training steps (not evaluations, not start-up) over the
# whole run, resumes included; "train" holds the mean training loss since the previous entry
# (recon: the reconstruction loss, 0 for a plain model).


def read_log(out_dir, upto):
    """The log of a run being resumed at step `upto` (what came later was not checkpointed)."""
    try:
        with open(os.path.join(out_dir, "log.json")) as f:
            log = json.load(f)
    except (OSError, ValueError):   # none yet, or unreadable: start a new one
        return {"evals": [], "train": []}
    return {k: [e for e in log.get(k, []) if e["iter"] <= upto] for k in ("evals", "train")}


def restore(run, ckpt, cfg):
    """Set the counters of a run (iter_num, start_iter, saved_iter, train_seconds, best_val_loss)
    and its log: a resumed run's from its checkpoint and log.json (ckpt), a new run's from zero."""
    run.iter_num, run.train_seconds, run.best_val_loss = \
        (ckpt[k] for k in ("iter_num", "train_seconds", "best_val_loss")) if ckpt else (0, 0.0, float("inf"))
    run.start_iter = run.saved_iter = run.iter_num
    run.log = {"config": dataclasses.asdict(cfg),
               **(read_log(cfg.out_dir, run.iter_num) if ckpt else {"evals": [], "train": []})}


def write_log(out_dir, log):
    atomic_write(os.path.join(out_dir, "log.json"), lambda f: f.write(json.dumps(log).encode()))

# -----------------------------------------------------------------------------
# Stopping


class Interrupt:
    """Ctrl-C while training: the first asks the loop to stop after the current step (it saves a
    checkpoint and says how to resume); a second one ends the process at once. Subtle: torchrun
    passes the terminal's Ctrl-C on to its workers, so under DDP each rank gets it twice in a few
    milliseconds; there a second one within a second counts as the same press."""

    def __init__(self, ddp):
        self.requested, self.ddp, self.at, self.previous = False, ddp, 0.0, None
        if threading.current_thread() is threading.main_thread():   # only it may handle signals
            self.previous = signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame):
        if self.requested and not (self.ddp and time.monotonic() - self.at < 1.0):
            os._exit(130)                 # no save, no traceback (the shell's code for Ctrl-C)
        if not self.requested:            # os.write: print could re-enter a print it interrupted
            os.write(2, b"\nCtrl-C: stopping after this step, to save it (Ctrl-C again: quit at once)\n")
        self.requested, self.at = True, time.monotonic()

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def resume_command(out_dir, world, *more):
    """The command that continues the run in out_dir (with `more` settings changed)."""
    launch = ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    args = [os.path.relpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")),
            "--init_from=resume", f"--out_dir={out_dir}", *more]
    return " ".join(launch + [shlex.quote(a) for a in args])


def resume_settings(cfg, argv, fixed):
    """(the settings of the run saved in cfg.out_dir with argv on top, (model, checkpoint)).
    ValueError if the checkpoint is not train.py's or argv changes a setting named in `fixed`.

    A checkpoint holds its settings as a flat dict of the settings dataclass's fields (train.py
    has always written them so); a field it lacks takes today's default."""
    resumed = cli.load_checkpoint(cfg.out_dir, "cpu")
    kind = type(cfg)
    unknown = set(resumed[1].get("config", {"?": 0})) - set(kind.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{cfg.out_dir}: not a train.py checkpoint, or another version's (settings {sorted(unknown)})")
    saved, new = kind(**resumed[1]["config"]), kind(**resumed[1]["config"])
    cli.configure(new, argv)
    new.out_dir = cfg.out_dir       # where it was found (and locked), even if the folder was renamed
    changed = [f"{k}={getattr(new, k)!r} (the run has {getattr(saved, k)!r})" for k in fixed
               if getattr(new, k) != getattr(saved, k)]
    if changed:
        raise ValueError(f"cannot change on resume: {', '.join(changed)}")
    return new, resumed


def claim(cfg, argv, fixed, writes, held):
    """(the run's settings, (model, checkpoint) when resumed, else None). A process that writes
    locks out_dir for as long as `held` lasts; a resumed run takes its saved settings, argv on top
    (resume_settings); a new run refuses to replace a ckpt.pt unless --overwrite=True. ValueError
    says which of these stands in the way."""
    if writes and (cfg.init_from != "resume" or os.path.isdir(cfg.out_dir)):
        held.enter_context(lock(cfg.out_dir))
    resumed = None
    if cfg.init_from == "resume":   # the run's own settings, with the command line on top
        cfg, resumed = resume_settings(cfg, argv, fixed)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if writes and not resumed and os.path.exists(path) and not cfg.overwrite:
        raise ValueError(f"{path} exists: continue it with --init_from=resume, choose another "
                         f"--out_dir, or replace it with --overwrite=True")
    return cfg, resumed
