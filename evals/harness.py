"""
zip2zip in lm-evaluation-harness: the paper's task protocol for a train.py checkpoint.

    pip install lm-eval
    python -m evals.harness                                   # the three offline tasks of tasks/, on train.py's out_dir
    python -m evals.harness --out_dir=out-cpu --tasks=zip2zip_prose_cloze --beam_size=16 --limit=50
    python -m evals.harness --out_dir=out-cpu --tasks=hellaswag     # any lm-eval task whose data it can download

lm-eval's own messages (log lines, progress bars, warnings) are kept out of sight; --verbose shows them.

Importing this file registers the lm-eval model name `zip2zip`, so that from Python
`import evals.harness; lm_eval.simple_evaluate(model="zip2zip", model_args="out_dir=out-cpu,beam_size=0",
tasks=[...])` works too. lm-eval is an optional extra: the method (zip2zip.py) never imports it.

What the three kinds of request mean for a model whose vocabulary grows as it reads (DESIGN.md 2.2):
- loglikelihood (context, continuation): log P(continuation | context) = log P_prefix(context +
  continuation) - log P_prefix(context), likelihood.loglikelihoods. As lm-eval's Hugging Face model does:
  trailing whitespace of the context moves to the continuation, the pair is tokenized together
  and split where the context's own tokens end; the context gets an <|endoftext|> in front, the
  start every training window has. Requests that share a context are scored together. An empty
  continuation scores (0.0, True): nothing follows any context with probability 1 (the split would
  otherwise move the context's last token into it and score that).
- loglikelihood_rolling (document): the prefix log-likelihood of the whole document after an
  <|endoftext|>, of any length (past the context the KV-cached Stepper crops, as generation does).
- generate_until (context, {until, max_gen_toks, temperature}): the first code is drawn among the
  codes that spell the context's end (the exact conditional of DESIGN.md 2.3, the same rule as
  is_greedy), then the static decoding step writes on until a stop string or max_gen_toks base
  tokens; greedy unless a temperature > 0 is given. lm-eval hands over every task's requests in
  one call: only requests with the same generation settings share a batch (lm-eval's Hugging Face
  model groups them the same way).
"""

import io
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field

import torch

from evals import multiview
from fastgen import StaticStepper
from lib import cli
from zip2zip import lzw_encode

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:            # --help still works; main() says what to install
    LM, register_model = object, lambda name: (lambda cls: cls)

TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks")
OFFLINE_TASKS = "zip2zip_code_mc, zip2zip_prose_cloze, zip2zip_pycode_bpb"   # tasks/: their data ship here


@dataclass
class HarnessConfig:
    out_dir: str = field(default_factory=cli.train_out_dir)   # train.py's out_dir (a folder holding ckpt.pt) or
                                  # a checkpoint file; by default where `python train.py` writes on this machine
    tasks: str = "zip2zip_code_mc,zip2zip_prose_cloze,zip2zip_pycode_bpb"   # lm-eval task names, comma-separated
    beam_size: int = 0            # 0: canonical scoring (exact for canonical models); N: the multi-view sum
    batch_size: int = 16          # rows per forward pass (continuations of one context) or per decoding step
    limit: int = 0                # at most this many documents per task; 0: all
    num_fewshot: int = 0          # examples in front of each context
    device: str = "auto"          # "cpu", "cuda", "cuda:1", ...; auto: cuda when there is one
    dtype: str = "float32"        # float32, bfloat16 or float16 (autocast); likelihoods want float32
    seed: int = 1337              # lm-eval's seeds (few-shot sampling) and torch's
    output: str = ""              # also write lm-eval's results as JSON to this file (its folder must exist)
    verbose: bool = False         # also show lm-eval's own log lines, progress bars and warnings


@register_model("zip2zip")
class Zip2Zip(LM):
    """An lm-eval model for a zip2zip checkpoint (train.py's out_dir, or a ckpt.pt file)."""

    def __init__(self, out_dir=None, device="auto", batch_size=16, beam_size=0, dtype="float32", **unused):
        super().__init__()
        out_dir = out_dir or cli.train_out_dir()
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 16                      # lm-eval's "auto": rows per pass are bounded anyway
        self.batch_size, self.beam_size = int(batch_size), int(beam_size)
        cli.check(self, ("batch_size", self.batch_size >= 1, "1 or more"), ("beam_size", self.beam_size >= 0, "0 or more"))
        self.device_name = cli.device(device or "auto")
        self.model = cli.load_checkpoint(out_dir, self.device_name)[0].eval()
        self.tok = cli.tokenizer_for(self.model.config)
        self.ctx = cli.autocast(dtype, self.device_name)[1]

    def split(self, context, continuation):
        """(context ids, continuation ids) of a request, as lm-eval's Hugging Face model splits it."""
        spaces = len(context) - len(context.rstrip())
        if spaces:                                # "Q: a " + "b" -> "Q: a" + " b"
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode_base(context + continuation)
        n = min(len(self.tok.encode_base(context)), len(whole) - 1)   # a continuation keeps one token at least
        return [self.tok.eot] + whole[:n], whole[n:]

    def loglikelihood(self, requests, disable_tqdm=False):
        # an empty continuation: nothing follows any context with probability 1 (the split would
        # move the context's last token into it)
        out = [(0.0, True) if r.args[1] == "" else None for r in requests]
        pairs = {i: self.split(*r.args) for i, r in enumerate(requests) if out[i] is None}
        by_context = {}                           # choices that share a context are read together
        for i, (ctx, _) in pairs.items():
            by_context.setdefault(tuple(ctx), []).append(i)
        for ctx, idx in by_context.items():
            for j in range(0, len(idx), self.batch_size):
                chunk = idx[j:j + self.batch_size]
                with self.ctx:
                    scored = multiview.loglikelihoods(self.model, list(ctx), [pairs[i][1] for i in chunk], self.beam_size)
                for i, result in zip(chunk, scored):
                    out[i] = result
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        with self.ctx:   # the prefix NLL of each whole document after an <|endoftext|> (likelihood.score)
            return [-multiview.score(self.model, r.args[0], self.tok, self.beam_size)[0] for r in requests]

    def generate_until(self, requests, disable_tqdm=False):
        # the rows of a batch share one temperature, and lm-eval may hand over greedy and sampling
        # requests (several tasks) in one call: a batch holds requests of equal gen_kwargs only
        groups = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out = [None] * len(requests)
        for idx in groups.values():
            for j in range(0, len(idx), self.batch_size):
                chunk = idx[j:j + self.batch_size]
                for i, text in zip(chunk, self.generate_batch([requests[i].args for i in chunk])):
                    out[i] = text
        return out

    @torch.no_grad()
    def generate_batch(self, args):
        """Continue each (context, gen_kwargs) through the static decoding step, one code per row a
        step; a row stops at a stop string, <|endoftext|>, or max_gen_toks base tokens. The rows of
        a batch share one temperature, the first row's: generate_until batches equal gen_kwargs."""
        m, c, tok = self.model, self.model.config, self.tok
        settings = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
        heads = [lzw_encode([tok.eot] + tok.encode_base(ctx), *settings) for ctx, _ in args]
        until = [[kw["until"]] if isinstance(kw.get("until"), str) else list(kw.get("until") or []) for _, kw in args]
        until = [[s for s in stops if s] + ["<|endoftext|>"] for stops in until]
        budget = [int(kw.get("max_gen_toks", 256)) for _, kw in args]
        kw = args[0][1]
        temperature = float(kw.get("temperature") or 0) if kw.get("do_sample", True) else 0.0
        with self.ctx:
            # read every context but its last code; the first code is drawn among the codes that
            # spell the context's end and may run past it (the text so far is the context, whatever
            # its last code would have been), then generation goes on as usual
            dec = StaticStepper(m, [h[:-1] or h for h in heads], temperature)
            codes, skip = [], []        # skip: base tokens of the first code that are still context
            for b, h in enumerate(heads):
                if len(h) == 1:           # an empty context: the start alone, read already
                    codes.append(dec.next[b])
                    skip.append(0)
                    continue
                allowed = m.last_code_choices(h)
                logits = dec.logits[b, allowed].float()
                pick = logits.argmax() if temperature == 0 else \
                    torch.multinomial(torch.softmax(logits / temperature, -1), 1)[0]
                codes.append(allowed[pick.item()])
                skip.append(len(dec.lzw[b].resolve(h[-1])))
            base, done = [[] for _ in args], [n <= 0 for n in budget]
            while not all(done):
                for b, code in enumerate(codes):
                    if done[b] or code < 0:       # -1: no valid code (DESIGN.md 2.1): the row ends
                        done[b] = True
                        continue
                    base[b] += dec.lzw[b].resolve(code)
                    text = tok.decode_base(base[b][skip[b]:])
                    done[b] = any(s in text for s in until[b]) or len(base[b]) - skip[b] >= budget[b]
                if not all(done):
                    dec.advance([max(code, 0) for code in codes])
                    codes = dec.next
        out = []
        for b in range(len(args)):
            text = tok.decode_base(base[b][skip[b]:][:budget[b]])
            out.append(text[:min([text.index(s) for s in until[b] if s in text], default=len(text))])
        return out


@contextmanager
def quiet(verbose):
    """lm-eval's chatter out of sight: its log lines below errors (and datasets'), progress bars,
    prints and warnings; what was printed is shown if something fails unexpectedly. verbose: all
    of it, lm-eval's log lines at INFO, as its own command line shows them."""
    if verbose:
        import lm_eval.utils
        getattr(lm_eval.utils, "setup_logging", lambda level: logging.basicConfig(level=level))(logging.INFO)
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    buffer = io.StringIO()
    try:
        for logger in loggers:   # their own handlers may write to the terminal directly
            logger.setLevel(logging.ERROR)
        with redirect_stdout(buffer), redirect_stderr(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except (ValueError, OSError, SystemExit):   # expected: a one-line error says it all
        raise
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_output(path):
    """--output's folder exists and can be written, before any task runs (ValueError otherwise)."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ValueError(f"--output={path}: a folder; expected a file name, such as "
                         f"{os.path.join(path, 'results.json')}")
    if not os.path.isdir(folder):
        raise ValueError(f"--output={path}: no folder {folder!r} to write it in (create it first)")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output={path}: the folder {folder!r} cannot be written")


def load_tasks(names, manager):
    """{name: [the lm-eval task or group, data loaded]}; ValueError naming a task whose data cannot
    be had (no network, not cached, offline mode), and what to do."""
    loaded = {}
    for name in names:
        try:
            built = manager.load(name)
        except OSError as e:   # datasets' ConnectionError and FileNotFoundError, the Hub's HTTP errors
            entry = getattr(manager, "task_index", {}).get(name)
            source = (getattr(entry, "cfg", None) or {}).get("dataset_path")
            offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
            raise ValueError(f"--tasks={name}: cannot load its data{f' ({source})' if source else ''}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Run it with network access"
                             f"{f' and {offline[0]} unset' if offline else ''}, with a copy of the data in the Hugging "
                             f"Face cache (HF_HOME), or run the offline tasks: {OFFLINE_TASKS}") from None
        loaded[name] = [built["groups"][name]] if name in built["groups"] else \
            [built["tasks"][name]] if name in built["tasks"] else list(built["tasks"].values())   # a tag: its tasks
    return loaded


def main(argv=None):
    cfg = HarnessConfig()
    with cli.one_line_errors():
        cli.configure(cfg, sys.argv[1:] if argv is None else argv, presets=False, positional=False)
        cli.check(cfg, ("limit", cfg.limit >= 0, "0 (all) or more"), ("num_fewshot", cfg.num_fewshot >= 0, "0 or more"),
                  ("dtype", cfg.dtype in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"))
        if cfg.output:
            check_output(cfg.output)
        if LM is object:
            raise ValueError("lm-evaluation-harness is not installed: pip install lm-eval")
        model = Zip2Zip(cfg.out_dir, cfg.device, cfg.batch_size, cfg.beam_size, cfg.dtype)   # a second
        import lm_eval
        from lm_eval.tasks import TaskManager
        tasks = [t for t in cfg.tasks.split(",") if t]
        with quiet(cfg.verbose):
            manager = TaskManager(include_path=TASKS, include_defaults=False)   # the shipped tasks load in a second
            if not set(tasks) <= set(manager.all_tasks):   # lm-eval's own tasks: indexing them takes a few seconds
                manager = TaskManager(include_path=TASKS)
            missing = [t for t in tasks if t not in manager.all_tasks]
            if not tasks or missing:
                raise ValueError(f"--tasks={cfg.tasks}: unknown task {missing[0] if missing else '(none given)'!r}; "
                                 f"the offline ones are {OFFLINE_TASKS}")
            loaded = load_tasks(tasks, manager)   # each task's data: one that cannot be had stops here
    merged, seconds = {}, {}
    for task in tasks:                   # one task at a time, so that each one's time is its own
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        with quiet(cfg.verbose):
            results = lm_eval.simple_evaluate(model=model, tasks=loaded[task], task_manager=manager,
                                              limit=cfg.limit or None, num_fewshot=cfg.num_fewshot,
                                              random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                              torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                              log_samples=False)
        seconds[task] = time.perf_counter() - t0
        for key in ("results", "versions", "n-shot", "higher_is_better", "configs", "n-samples"):
            merged.setdefault(key, {}).update(results.get(key) or {})
    c = model.model.config
    print(f"{cfg.out_dir}: M={c.max_subtokens}, canonical={c.canonical}, beam_size={cfg.beam_size}; seconds: " +
          ", ".join(f"{t} {s:.1f}" for t, s in seconds.items()))
    print(lm_eval.utils.make_table(merged))
    if cfg.output:
        import json
        with open(cfg.output, "w") as f:
            json.dump({"results": merged["results"], "seconds": seconds, "config": vars(cfg)}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
