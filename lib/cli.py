"""
What every script shares: settings from preset files and --key=value (with --help), one-line
errors for bad input, the device, checkpoints, tables, and showing codes as text with their
hypertokens marked. (The method itself is in zip2zip.py.)

A script's main has two stages. Its set-up reads and checks every setting and input (files,
checkpoint, device, GPT-2's ranks) inside `with one_line_errors():`, so that a mistake costs
one line `error: ...` naming the setting or file, before any long work starts. The work after
it raises only on true bugs, which keep their traceback.
"""

import codecs
import os
import re
from contextlib import contextmanager, nullcontext

import torch

from zip2zip import GPT, GPTConfig, Tokenizer, lzw_decode


@contextmanager
def one_line_errors():
    """Turn the expected failures of a script's set-up into `error: <message>` and exit status 1.

    Expected failures are ValueError (a setting or an input that is wrong) and OSError (a file
    that is missing or unreadable, GPT-2's ranks included). Their messages name what is wrong.
    """
    try:
        yield
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def check(cfg, *rules):
    """Settings against their rules, each (key, ok, what is expected): ValueError for the first
    rule broken. Example: check(cfg, ("top_k", cfg.top_k >= 0, "0 (all codes) or more"))."""
    for key, ok, expected in rules:
        if not ok:
            raise ValueError(f"--{key}={getattr(cfg, key)}: expected {expected}")


def device(name):
    """The torch device a --device setting names; "auto": cuda when there is one, else cpu.
    ValueError naming --device for an unknown device or one this machine lacks."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: unknown device; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: CUDA is not available here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device={name}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device={name}: not supported; expected auto, cpu, cuda, cuda:N or mps")
    return name


def autocast(dtype, device):
    """(dtype name, context to compute in) for a --dtype setting on a device (as cli.device gives
    it): "auto" is bfloat16 on a GPU that has it, else float32; float32 runs without autocast,
    bfloat16 and float16 under it (nanoGPT's rule)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dtype, nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=getattr(torch, dtype))

# -----------------------------------------------------------------------------
# settings


def _coerce(value, default, where):
    """`value` (a literal, or a command-line string) as the type of `default`, or ValueError."""
    import ast
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        if kind is bool and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
    if kind is float and type(value) is int:
        value = float(value)
    if default is not None and type(value) is not kind:
        raise ValueError(f"{where}: expected {kind.__name__} (like the default {default!r}), "
                         f"got {value!r}")
    return value


def configure(config, args, presets=True, positional=True):
    """Apply preset files and `--key=value` overrides (`--flag` alone: True) to a dataclass instance,
    in order.

    A preset (`config/name.py`) is a file of `key = literal` lines: parsed, never executed.
    Unknown keys (with the closest known one) and values of the wrong type raise ValueError naming
    them. `--help` or `-h` anywhere prints help_text(config) with the values in force (presets and
    other arguments applied, any that fail skipped: help wins) and exits with status 0. Returns
    the remaining positional arguments; with positional=False (a script that takes none) one is a
    ValueError.
    """
    import ast
    import dataclasses
    import difflib
    import io
    import tokenize
    wants_help = "--help" in args or "-h" in args
    known = {f.name for f in dataclasses.fields(config)}
    origins = {}   # key -> (preset file, the comment on its line), for help: where a value came from

    def set_value(key, value, where, origin=None):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            dashes = "--" if where.startswith("--") else ""
            raise ValueError(f"{where}: unknown key {key!r}; " +
                             (f"did you mean {dashes}{close[0]}?" if close else "--help lists the settings"))
        setattr(config, key, _coerce(value, getattr(config, key), where))
        origins.pop(key, None)
        if origin:
            origins[key] = origin

    def apply(arg):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq and key in known:   # a bare --flag sets a True/False setting
                if type(getattr(config, key)) is not bool:
                    raise ValueError(f"{arg}: expected --key=value (see --help)")
                value = True
            set_value(key, value, arg)
        elif presets and arg.endswith(".py"):
            if not os.path.isfile(arg):
                raise ValueError(f"preset {arg!r} not found")
            source, name = open(arg).read(), _shown_path(arg)
            comments = {t.start[0]: t.string.lstrip("#").strip() for t in
                        tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
            for node in ast.parse(source, arg).body:
                where = f"{arg}:{node.lineno}"
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    raise ValueError(f"{where}: a preset holds only `key = literal` lines")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise ValueError(f"{where}: the value of {node.targets[0].id} is not a literal") from None
                set_value(node.targets[0].id, value, where, (name, comments.get(node.end_lineno, "")))
        else:
            return arg

    rest = []
    for arg in args:
        if arg in ("--help", "-h"):
            continue
        try:
            if apply(arg) is not None:
                rest.append(arg)
        except ValueError:
            if not wants_help:
                raise
    if wants_help:
        print(help_text(config, origins))
        raise SystemExit(0)
    if rest and not positional:
        raise ValueError(f"unexpected argument {rest[0]!r} (options are --key=value; see --help)")
    return rest


def _shown_path(path):
    """A preset's path as the reader would type it: relative to the repository when inside it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(path)
    return os.path.relpath(full, repo) if full.startswith(repo + os.sep) else path


def train_out_dir():
    """Where `python train.py` writes on this machine, so that the scripts that read a checkpoint
    find it by default: TrainConfig's "out" with CUDA; without, config/cpu.py's "out-cpu" (which
    train.py applies there; a test keeps the two in step)."""
    return "out" if torch.cuda.is_available() else "out-cpu"


def field_comments(cls):
    """[(field name or None, comment)] in source order, read from a dataclass's source: a field's
    trailing comment joined with the comment lines that continue it (indented past the fields);
    a comment line at the fields' own indentation is a section heading (name None).
    tokenize, not a split on "#": a default such as "#" or "a # b" is a string, not a comment.

    Example: `    n_head: int = 6   # heads\\n    #   of 64 dims\\n    # codec` ->
    [("n_head", "heads of 64 dims"), (None, "codec")]."""
    import ast
    import dataclasses
    import inspect
    import io
    import textwrap
    import tokenize
    names = {f.name for f in dataclasses.fields(cls)}
    source = textwrap.dedent(inspect.getsource(cls))
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    indent = body[0].col_offset
    # the fields end where the first method (or anything else) starts: its comments are not theirs
    end = next((min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) for n in body
                if not isinstance(n, ast.AnnAssign) and not (isinstance(n, ast.Expr) and n is body[0])), None)
    out, rows_seen = [], set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE):
            continue
        (row, col), first = tok.start, tok.start[0] not in rows_seen
        if end is not None and row >= end:
            break
        rows_seen.add(row)
        if tok.type == tokenize.NAME and first and col == indent and tok.string in names:
            out.append([tok.string, ""])
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not first and out:                   # after code: the comment of that line's field
                out[-1][1] = text
            elif col > indent and out and out[-1][0]:   # a comment line that continues a field's
                out[-1][1] = f"{out[-1][1]} {text}".strip()
            elif col == indent:                     # a section heading
                out.append([None, text])
    return [tuple(x) for x in out]


def fields_of(cls, defaults, but=()):
    """A dataclass holding the fields of dataclass `cls` (but those named in `but`), so that a
    script's settings take a model's without declaring them again: what each field means stays
    written once, in `cls`. `defaults` maps a field to (the script's value, why it differs from
    cls's default); help_text says both. Example: fields_of(GPTConfig, {"n_layer": (8, "small")})
    has every field of GPTConfig with GPTConfig's defaults, but n_layer = 8."""
    import dataclasses
    made = dataclasses.make_dataclass(f"{cls.__name__}Fields", [
        (f.name, f.type, dataclasses.field(default=defaults.get(f.name, (f.default,))[0],
                                           metadata={"why": defaults.get(f.name, (0, ""))[1]}))
        for f in dataclasses.fields(cls) if f.name not in but])
    unknown = set(defaults) - {f.name for f in dataclasses.fields(made)}
    assert not unknown, f"not fields of {cls.__name__}: {sorted(unknown)}"   # a bug in the script, not input
    made.copied_from = cls   # not a field: no annotation
    made.__doc__ = f"{cls.__name__}'s settings ({cls.__module__}.py says what each means)"
    return made


def config_of(cls, settings, names, **extra):
    """cls(**the fields `names` of `settings`, **extra), checked by cls itself; its ValueError names
    the flags. Example: GPTConfig's "n_embd=512 is not a multiple of n_head=3" becomes "--n_embd=512
    is not a multiple of --n_head=3"."""
    try:
        return cls(**{k: getattr(settings, k) for k in names}, **extra)
    except ValueError as e:
        raise ValueError(re.sub(rf"(?<![\w-])({'|'.join(names)})\b", r"--\1", str(e))) from None


def described_fields(cls):
    """field_comments of a settings dataclass and of its bases, in field order; a base made by
    fields_of takes each comment from the class it copies (prefixed with the script's reason when
    its default differs) under the heading of its docstring."""
    import dataclasses
    out = []
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" not in vars(klass):
            continue
        source = vars(klass).get("copied_from")
        if source is None:
            out += field_comments(klass)
            continue
        theirs, defaults = dict(field_comments(source)), {f.name: f.default for f in dataclasses.fields(source)}
        out.append((None, klass.__doc__))
        for f in dataclasses.fields(klass):
            why = f.metadata["why"]
            theirs_default = f"{source.__name__}'s default {_typed(defaults[f.name])}" + \
                (f": {theirs[f.name]}" if theirs[f.name] else "")
            out.append((f.name, f"{why}; {theirs_default}" if why else theirs[f.name]))
    return out


def _typed(value):
    """A value as one would type it after --key=: plain words bare, anything else as a literal."""
    return value if isinstance(value, str) and value and value.isprintable() and " " not in value else repr(value)


def help_text(config, origins=None):
    """--help: the script's summary and usage (its module docstring's first paragraph, and its
    lines that start with `python` or `torchrun`), then every setting with the value in force
    and its comment in the dataclass (described_fields: a model's fields are explained where they
    are declared). A value that a preset set (train.py's config/cpu.py on a machine without CUDA)
    is labelled with the preset and its comment, and the dataclass comment
    is said to be the default's, since it explains that value: `origins` maps such a key to
    (preset file, comment). A value changed otherwise shows the dataclass default beside it."""
    import dataclasses
    import sys
    doc = (sys.modules[type(config).__module__].__doc__ or "").strip("\n")
    lines = doc.splitlines()
    usage = [line for line in lines if line.strip().startswith(("python ", "torchrun "))]
    summary = doc.split("\n\n")[0].strip() or type(config).__name__   # the first paragraph
    out = [summary, ""]
    if usage:
        out += ["usage:"] + usage + [""]
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    origins = origins or {}
    rows = []
    for name, comment in described_fields(type(config)):
        if name is None:
            rows.append((f"# {comment}", ""))
            continue
        value, default = getattr(config, name), defaults[name]
        if default is not dataclasses.MISSING and value != default:
            if name in origins:   # e.g. "config/cpu.py: a high rate; default 0.001: peak; ..."
                preset, why = origins[name]
                comment = f"{preset}{': ' + why if why else ''}; default {_typed(default)}" + \
                    (f": {comment}" if comment else "")
            else:
                comment = f"{comment} (default {_typed(default)})".strip()
        rows.append((f"--{name}={_typed(value)}", comment))
    width = min(max(len(a) for a, _ in rows), 34)
    out.append("settings (--key=value; the value shown is the one that applies):")
    out += [f"  {a:<{width}}  {b}".rstrip() if b else f"  {a}" for a, b in rows]
    return "\n".join(out)

# -----------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from a checkpoint file or a folder holding `ckpt.pt`.

    A checkpoint is a dict with at least `model` (a state dict) and `model_args` (GPTConfig's
    fields); train.py adds its config, optimizer and counters. It is read with torch's
    weights_only loader: tensors, numbers, strings, lists, tuples and dicts only, so a crafted
    file cannot run code (pickle would call whatever the file names). Errors (ValueError,
    FileNotFoundError) say what is wrong in one line.
    """
    import dataclasses
    import glob
    import pickle
    import re
    import warnings
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):   # say where there are some: a newcomer's run may have gone elsewhere
        found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join("out*", "ckpt.pt")))
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected a file or a folder holding ckpt.pt); " + (
            f"checkpoints in this folder: {', '.join(found)}" if found else "python train.py makes one"))
    try:
        with warnings.catch_warnings():   # an old-style pickle draws a warning before its error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:   # torch's many-line message, in one line
        code = re.search(r"GLOBAL (\S+)", str(e))
        if code:
            raise ValueError(f"{file!r} refused: it holds {code.group(1)}, which loading would call; a "
                             f"checkpoint holds only tensors, numbers, strings, lists and dicts") from None
        raise ValueError(f"{file!r} is not a readable checkpoint (not a file torch.save wrote)") from None
    except Exception as e:
        raise ValueError(f"{file!r} is not a readable checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{file!r} is not a zip2zip checkpoint (needs keys 'model' and 'model_args')")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(ckpt["model_args"]) - known
    if unknown:
        raise ValueError(f"{file!r}: unknown model settings {sorted(unknown)}")
    args = dict(ckpt["model_args"])
    args["disabled_ids"] = tuple(args.get("disabled_ids", ()))
    args.setdefault("canonical", False)   # saved before the setting existed: trained unmasked
    model = GPT(GPTConfig(**args))
    # torch.compile prefixes parameter names with _orig_mod.; DDP with module.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file!r} does not match its own model settings: {str(e).splitlines()[0]}") from None
    return model.to(device), ckpt

# -----------------------------------------------------------------------------
# output


def table(rows, left=1):
    """Rows of cells as lines of aligned columns, two spaces apart whatever a cell holds: the
    first `left` columns aligned left, the others right. Example: [["a", "1"], ["bb", "not
    installed"]] -> ["a               1", "bb  not installed"]."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


# Marks for hypertokens without colour: the first pair none of whose characters occurs in the
# text, so a mark can never be taken for the text's own brackets ([..] could: it is code). A
# text that holds all five pairs gets the last one anyway.
MARKS = (("⟦", "⟧"), ("⟪", "⟫"), ("⟨", "⟩"), ("⦃", "⦄"), ("⁅", "⁆"))
def tokenizer_for(config):
    """The Tokenizer a model (a GPTConfig) was trained with: its C, M and disabled ids, which are
    <|endoftext|> alone, or with every digit token (no_digit_merges)."""
    if config.vocab_size != 50257:
        raise ValueError(f"the model's base vocabulary has {config.vocab_size} ids, GPT-2 BPE has 50257")
    for no_digit_merges in (False, True):
        tok = Tokenizer(config.max_subtokens, config.max_codebook_size, no_digit_merges)
        if tok.disabled_ids == frozenset(config.disabled_ids):
            return tok
    raise ValueError(f"the model's disabled ids ({len(config.disabled_ids)} of them) are neither "
                     f"<|endoftext|> alone nor <|endoftext|> and every token with a digit")


def segments(tok, codes):
    """[(code, text)] for each code. Text is decoded incrementally, so a character split across
    codes is shown with the code that completes it; bytes that are not UTF-8 text where they stand
    (a character cut off at the end, or bytes out of order) are shown as escapes such as \\xe2."""
    lzw, utf8, out = tok.codec(), codecs.getincrementaldecoder("utf-8")("backslashreplace"), []
    for i, code in enumerate(codes):
        ids = lzw.push(code, i)
        out.append((code, utf8.decode(b"".join(tok.token_bytes[t] for t in ids))))
    if out:
        out[-1] = (out[-1][0], out[-1][1] + utf8.decode(b"", final=True))
    return out


COLORS = (41, 44)   # red and blue backgrounds, alternating, so neighbouring hypertokens stay apart


def show(tok, codes, color=True, skip=0):
    """The text of codes[skip:] as it reads, with each hypertoken marked in a way that keeps its
    layout, after legend lines saying how (none when there is nothing to explain). The first
    `skip` codes (a prompt, say) only build the codebook the rest is decoded with; not shown.

    color=True (a terminal): alternating background colours (ANSI) on each hypertoken, its
    whitespace included, closed before a line break and opened again after it. color=False (a log,
    a pipe): the first pair of MARKS that the text (the skipped codes' included) does not contain,
    around each line's part of a hypertoken from its first to its last visible character, so that
    line breaks and indentation stay as they are (a hypertoken of whitespace alone is not marked).
    Bytes that are not UTF-8 text where they stand are shown as \\xNN, and the legend says so.
    Example, no colour, on "def f(x):\\n    return x\\n\\ndef g(x):\\n    return x\\n" (M=4): the legend
    "hypertokens are shown ⟦like this⟧", then "def f(x):\\n    return x\\n\\ndef g⟦(x⟧⟦):⟧\\n    ⟦return x⟧\\n"
    (whitespace at either end of a hypertoken's line is left outside the marks; colours show it)."""
    pieces = segments(tok, codes)
    text = "".join(t for _, t in pieces)
    if color:
        paint = lambda k, t: f"\x1b[{COLORS[k % 2]};97m{t}\x1b[0m" if t else t
        legend = f"hypertokens are shown {paint(0, 'like')} {paint(1, 'this')}"
    else:
        left, right = next((pair for pair in MARKS if not set("".join(pair)) & set(text)), MARKS[-1])

        def paint(k, t):   # around the visible part of one line: its whitespace stays where it is
            core = t.strip()
            i = t.find(core)
            return f"{t[:i]}{left}{core}{right}{t[i + len(core):]}" if core else t
        legend = f"hypertokens are shown {left}like this{right}"
    parts, k = [], 0
    for code, t in pieces[skip:]:
        if code < tok.vocab_size:
            parts.append(t)
        else:   # line by line: no mark or colour spans a line break
            parts.append("\n".join(paint(k, line) for line in t.split("\n")))
            k += 1
    notes = [legend] if k else []
    ids = lzw_decode(codes, tok.vocab_size, tok.max_codebook_size, tok.max_subtokens, tok.disabled_ids)
    try:
        b"".join(tok.token_bytes[t] for t in ids).decode("utf-8")
    except UnicodeDecodeError:   # e.g. a sample that ends inside a character
        notes.append("\\xNN is a byte that is not UTF-8 text where it stands (a character cut off or out of order)")
    return "".join(note + "\n" for note in notes) + "".join(parts)
