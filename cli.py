"""
What every script shares: settings from preset files and --key=value, checkpoints, and showing
codes as text with their hypertokens marked. (The method itself is in zip2zip.py.)
"""

import os

import torch

from zip2zip import GPT, GPTConfig


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


def configure(config, args, presets=True):
    """Apply preset files and `--key=value` overrides to a dataclass instance, in order.

    A preset (`config/name.py`) is a file of `key = literal` lines: parsed, never executed.
    Unknown keys and values of the wrong type raise ValueError naming them. Returns the
    remaining positional arguments.
    """
    import ast
    import dataclasses
    known = {f.name for f in dataclasses.fields(config)}

    def set_value(key, value, where):
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        setattr(config, key, _coerce(value, getattr(config, key), where))

    positional = []
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"{arg}: expected --key=value")
            set_value(key, value, arg)
        elif presets and arg.endswith(".py"):
            if not os.path.isfile(arg):
                raise ValueError(f"preset {arg!r} not found")
            for node in ast.parse(open(arg).read(), arg).body:
                where = f"{arg}:{node.lineno}"
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    raise ValueError(f"{where}: a preset holds only `key = literal` lines")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise ValueError(f"{where}: the value of {node.targets[0].id} is not a literal") from None
                set_value(node.targets[0].id, value, where)
        else:
            positional.append(arg)
    return positional


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from a checkpoint file or a folder holding `ckpt.pt`.

    A checkpoint is a dict with at least `model` (a state dict) and `model_args` (GPTConfig's
    fields); train.py adds its config, optimizer and counters. Errors say what is wrong.
    """
    import dataclasses
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected a file or a folder holding ckpt.pt)")
    try:
        ckpt = torch.load(file, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"{file!r} is not a readable checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{file!r} is not a zip2zip checkpoint (needs keys 'model' and 'model_args')")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(ckpt["model_args"]) - known
    if unknown:
        raise ValueError(f"{file!r}: unknown model settings {sorted(unknown)}")
    args = dict(ckpt["model_args"])
    args["disabled_ids"] = tuple(args.get("disabled_ids", ()))
    model = GPT(GPTConfig(**args))
    # torch.compile prefixes parameter names with _orig_mod.; DDP with module.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file!r} does not match its own model settings: {e}") from None
    return model.to(device), ckpt


def show(tok, codes, color=True):
    """The text with its hypertokens marked: alternating ANSI colours, or [brackets]."""
    parts, k = [], 0
    for code, text in tok.segments(codes):
        if code < tok.vocab_size:
            parts.append(text)
        elif color:
            parts.append(f"\x1b[{(41, 44)[k % 2]};97m{text}\x1b[0m")
            k += 1
        else:
            parts.append(f"[{text}]")
    return "".join(parts)
