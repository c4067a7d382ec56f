"""lib/cli.py and the first use of every script: --help, one-line errors for bad input, checkpoints
that cannot run code, the device, tables, and how hypertokens are marked."""
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import data.common
import sample
import zip2zip
from data.prose import prepare as prose_prepare
from data.pycode import prepare as pycode_prepare
from evals import efficiency, reproduce
from lib import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Example:
    # a section
    name: str = "a # b"     # the comment, not the "#" in the string
    size: int = 3           # a comment that
                            #   goes on
    bare: float = 0.5
    # another section
    flag: bool = False      # last


@dataclasses.dataclass
class WithMethod:
    size: int = 1           # the size

    @property
    def big(self):
        return self.size > 1    # not a field's comment


def test_field_comments_read_the_source():
    assert cli.field_comments(WithMethod) == [("size", "the size")]
    assert cli.field_comments(Example) == [(None, "a section"), ("name", "the comment, not the \"#\" in the string"),
                                           ("size", "a comment that goes on"), ("bare", ""),
                                           (None, "another section"), ("flag", "last")]


SCRIPTS = {"sample": (sample, sample.SampleConfig), "bench": (bench, bench.BenchConfig),
           "efficiency": (efficiency, efficiency.ReportConfig), "reproduce": (reproduce, reproduce.ReproduceConfig),
           "pycode": (pycode_prepare, pycode_prepare.PrepareConfig), "prose": (prose_prepare, prose_prepare.PrepareConfig)}


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(capsys, name, flag):
    module, config = SCRIPTS[name]
    with pytest.raises(SystemExit) as e:
        module.main(["--bogus=1", flag])                  # help wins over a bad setting
    assert e.value.code == 0
    out = capsys.readouterr().out
    summary, usage = module.__doc__.strip().split("\n\n")[0], [line for line in module.__doc__.splitlines()
                                                                if line.strip().startswith("python ")]
    assert out.startswith(summary) and usage and all(line in out for line in usage)
    comments, defaults = dict(cli.field_comments(config)), config()
    for field in dataclasses.fields(config):             # every setting, its default, its comment
        line = next(line for line in out.splitlines() if line.startswith(f"  --{field.name}="))
        assert line.startswith(f"  --{field.name}={cli._typed(getattr(defaults, field.name))} ")
        assert comments[field.name] and line.endswith(comments[field.name])   # every default has its reason


def test_help_of_train_as_a_command():
    # train.py gets --help from cli.configure: its TrainConfig, with config/cpu.py applied on a CPU,
    # where a value the preset set says so, and the default's reason is given as the default's
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--help"], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stderr == ""
    for line in ("usage:", "    python train.py config/plain_cpu.py", "  # AdamW"):
        assert line in r.stdout
    # a model setting is explained where it is declared, GPTConfig; where the job's value differs, why
    import train
    model = dict(cli.field_comments(zip2zip.GPTConfig))
    line = next(line for line in r.stdout.splitlines() if line.startswith("  --max_subtokens="))
    assert line.endswith(model["max_subtokens"])
    line = next(line for line in r.stdout.splitlines() if line.startswith("  --bias="))
    assert line.split(None, 1)[1] == f"{train.MAIN_JOB['bias'][1]}; GPTConfig's default True: {model['bias']}"
    if not torch.cuda.is_available():
        line = next(line for line in r.stdout.splitlines() if "--gradient_accumulation_steps=" in line)
        assert line.split() == ["--gradient_accumulation_steps=1", "config/cpu.py;", "default", "2:", "micro-batches",
                                "per", "step,", "over", "all", "DDP", "ranks", "together:", "32", "x", "1024", "codes;",
                                "each", "rank", "takes", "an", "equal", "share,", "at", "least", "one", "(more",
                                "ranks:", "a", "bigger", "step)"]
        line = next(line for line in r.stdout.splitlines() if "--batch_size=" in line)
        assert "--batch_size=4" in line and "config/cpu.py: small batches" in line and "default 16: rows" in line


def test_help_shows_the_values_in_force_and_where_they_come_from(tmp_path, capsys):
    @dataclasses.dataclass
    class Settings:
        n: int = 1              # a number
        name: str = "a"         # a string
        flag: bool = False      # a switch

    preset = tmp_path / "p.py"
    preset.write_text("n = 3   # three is plenty here\nname = 'b'\n")
    with pytest.raises(SystemExit) as e:
        cli.configure(Settings(), [str(preset), "--flag", "--bogus=1", "--name=c", "--help"])   # help wins
    assert e.value.code == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  --")}
    assert lines == {"--n=3": f"{preset}: three is plenty here; default 1: a number",
                     "--name=c": "a string (default a)", "--flag=True": "a switch (default False)"}


def test_a_misspelt_setting_names_the_closest_one(tmp_path):
    import train
    with pytest.raises(ValueError) as e:
        train.read_config(["--max_second=60"], cuda=False, world=1)
    assert str(e.value) == "--max_second=60: unknown key 'max_second'; did you mean --max_seconds?"
    preset = tmp_path / "p.py"
    preset.write_text("lerning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r":1: unknown key 'lerning_rate'; did you mean learning_rate\?$"):
        train.read_config([str(preset)], cuda=False, world=1)
    with pytest.raises(ValueError, match=r"^--zzz=1: unknown key 'zzz'; --help lists the settings$"):
        train.read_config(["--zzz=1"], cuda=False, world=1)


def test_readers_of_a_checkpoint_look_where_train_writes_by_default():
    from evals import harness   # (imports without lm-eval too)
    import train
    assert cli.train_out_dir() == train.read_config([], torch.cuda.is_available(), 1).out_dir
    assert sample.SampleConfig().out_dir == harness.HarnessConfig().out_dir == cli.train_out_dir()


def test_no_test_reaches_the_network():
    # conftest.py refuses to look up any host but this machine: a download fails at once, offline or not
    import socket
    with pytest.raises(socket.gaierror, match="the tests run offline"):
        socket.create_connection(("example.com", 443), timeout=1)


@pytest.mark.parametrize("module", ["evals.efficiency", "evals.reproduce", "evals.harness"])
def test_evals_scripts_run_as_modules_from_the_root(module):
    # the README's commands for the scripts in evals/: `python -m evals.<name>` from the repository
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert f"python -m {module} " in r.stdout


# -----------------------------------------------------------------------------
# one-line errors


def test_one_line_errors_turns_only_expected_failures_into_a_line():
    for error in (ValueError("--x=1: expected 2"), FileNotFoundError("no file f")):
        with pytest.raises(SystemExit) as e, cli.one_line_errors():
            raise error
        assert str(e.value) == f"error: {error}"
    with pytest.raises(KeyError), cli.one_line_errors():   # a bug keeps its traceback
        raise KeyError("bug")


def test_check_names_the_setting():
    cfg = sample.SampleConfig(top_k=-3)
    cli.check(cfg, ("num_samples", cfg.num_samples >= 0, "0 or more"))
    with pytest.raises(ValueError, match=r"^--top_k=-3: expected 0 or more$"):
        cli.check(cfg, ("num_samples", True, "0 or more"), ("top_k", cfg.top_k >= 0, "0 or more"))


def test_device():
    assert cli.device("auto") == ("cuda" if torch.cuda.is_available() else "cpu") and cli.device("cpu") == "cpu"
    for name, message in [("gpu", "unknown device"), ("cuda:x", "unknown device"), ("meta", "not supported")] + \
            ([("cuda", "CUDA is not available here"), ("cuda:1", "CUDA is not available here")]
             if not torch.cuda.is_available() else []):
        with pytest.raises(ValueError, match=f"^--device={name}: {message}"):
            cli.device(name)


def test_autocast_resolves_the_dtype_once_for_every_script():
    assert cli.autocast("auto", "cpu")[0] == "float32"         # no GPU: full precision
    name, ctx = cli.autocast("float32", "cpu")
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
    name, ctx = cli.autocast("bfloat16", "cpu")
    with ctx:
        assert name == "bfloat16" and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.fixture
def no_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(data.common, "RANKS", str(tmp_path / "missing" / "r50k_base.tiktoken"))


def tiny_checkpoint(path):
    cfg = zip2zip.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    torch.save({"model": zip2zip.GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg)}, path)
    return str(path)


def test_missing_ranks_is_one_line_in_every_script(no_ranks, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("x = 1\n")
    for main, argv in ((sample.main, [f"--out_dir={tiny_checkpoint(tmp_path / 'ckpt.pt')}"]),
                       (bench.main, ["--quick=True", "--parts=codec"]), (efficiency.main, [str(text)]),
                       (reproduce.main, ["--max_tokens=100", "--decode=False"]),
                       (prose_prepare.main, [f"--out_dir={tmp_path / 'prose'}"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        message = str(e.value)
        assert message.startswith("error: GPT-2's BPE ranks (r50k_base) are missing") and "\n" not in message
    assert not (tmp_path / "prose").exists()


def test_prepare_errors(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    for argv, message in [([f"--stdlib_dir={tmp_path / 'none'}"], f"--stdlib_dir={tmp_path / 'none'}: expected a folder"),
                          ([f"--stdlib_dir={tmp_path / 'one'}"], "1 documents: a train and a val split need at least two"),
                          (["--val_fraction=1.5"], "--val_fraction=1.5: expected a fraction between 0 and 1"),
                          (["stray"], "unexpected argument 'stray'")]:
        with pytest.raises(SystemExit) as e:
            pycode_prepare.main([*argv, f"--out_dir={tmp_path / 'out'}"])
        assert str(e.value) == f"error: {message}" if "stray" not in argv else message in str(e.value)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# checkpoints


class RunsCode:
    """A pickle that calls open(marker, "w") when it is loaded: what a crafted ckpt.pt can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "it-ran"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": RunsCode(str(marker)), "model_args": {}}, path)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={tmp_path}"])
    message = str(e.value)
    assert message.startswith(f"error: {str(path)!r} refused: it holds io.open, which loading would call")
    assert "\n" not in message
    assert not marker.exists()                            # the code did not run


def test_train_checkpoint_loads_with_weights_only(tmp_path, capsys):
    # what train.py saves (optimizer state, its config, counters, metrics) is plain data
    import train
    tok = zip2zip.Tokenizer(4, 1024)
    text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), encoding="utf-8").read()
    for split, part in (("train", text), ("val", text[:4000])):
        np.array([tok.eot] + tok.bpe.encode_ordinary(part), dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    out = tmp_path / "out"
    train.main([f"--dataset={tmp_path}", f"--out_dir={out}", "--n_layer=1", "--n_head=2", "--n_embd=16",
                "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_windows=2",
                "--eval_interval=2", "--max_seconds=0", "--max_iters=2", "--warmup_iters=1", "--lr_decay_iters=2",
                "--sample_tokens=0", "--loader=sync", "--compile=False"])
    model, ckpt = cli.load_checkpoint(str(out))
    assert ckpt["iter_num"] == 2 and "optimizer" in ckpt and model.config.n_embd == 16
    sample.main([f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=2"])
    assert "--- sample 1/1: 2 codes" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# output


def test_table_keeps_columns_apart():
    lines = cli.table([["", "ours", "rust"], ["encode", "4.31M", "not installed"], ["decode", "12.0k", "-"]])
    assert lines == ["         ours           rust",
                     "encode  4.31M  not installed",
                     "decode  12.0k              -"]


@pytest.fixture(scope="module")
def tok():
    return zip2zip.Tokenizer(4, 1024)


def unmark(shown, left, right):
    return shown.split("\n", 1)[1].replace(left, "").replace(right, "")


def test_show_marks_cannot_be_taken_for_the_text(tok):
    code = "xs[i] = xs[i] + ys[i]\nxs[i] = xs[i] + ys[i]\n"
    shown = cli.show(tok, tok.encode(code), color=False)
    assert shown.startswith("hypertokens are shown ⟦like this⟧\n") and "⟦" in shown.split("\n", 1)[1]
    assert unmark(shown, "⟦", "⟧") == code                # the text's own brackets are untouched
    # a text that holds the first pair of marks gets the next one
    code = "a = '⟦⟧'\n" + code
    shown = cli.show(tok, tok.encode(code), color=False)
    assert shown.startswith("hypertokens are shown ⟪like this⟫\n") and unmark(shown, "⟪", "⟫") == code
    coloured = cli.show(tok, tok.encode(code), color=True)   # colours need no marks
    assert re.sub("\x1b\\[[0-9;]*m", "", coloured) == "hypertokens are shown like this\n" + code
    assert "\x1b[41;97m" in coloured and "\x1b[44;97m" in coloured
    assert cli.show(tok, tok.encode("no repeats"), color=False) == "no repeats"    # nothing to mark, no legend


CODE = ("class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        return 2\n\n"
        "    def h(self):\n        return 3\n\ndef f(x):\n    return x\n\ndef g(x):\n    return x\n")


def test_show_keeps_the_layout_of_code(tok):
    # the text reads as code: no mark or colour spans a line break, no mark sits in indentation
    shown = cli.show(tok, tok.encode(CODE), color=False)
    lines, originals = shown.split("\n")[1:], CODE.split("\n")
    assert "⟦" in shown and unmark(shown, "⟦", "⟧") == CODE
    for line, original in zip(lines, originals):
        assert line.count("⟦") == line.count("⟧")
        assert len(line) - len(line.lstrip()) == len(original) - len(original.lstrip()), (line, original)
        assert "⟦ " not in line and " ⟧" not in line and "⟦⟧" not in line   # whitespace stays outside the marks
    coloured = cli.show(tok, tok.encode(CODE), color=True)
    assert re.sub("\x1b\\[[0-9;]*m", "", coloured).split("\n", 1)[1] == CODE
    for line in coloured.split("\n"):
        assert len(re.findall("\x1b\\[4[14];97m", line)) == line.count("\x1b[0m")


def test_show_a_cut_character_as_its_bytes(tok):
    ids = tok.encode_base("🙂")                 # two base tokens: the first ends inside the character
    assert len(ids) == 2 and cli.show(tok, tok.encode("🙂"), color=False) == "🙂"
    shown = cli.show(tok, ids[:1], color=False)
    assert shown == "\\xNN is a byte that is not UTF-8 text where it stands (a character cut off or out of order)" \
                    "\n\\xf0\\x9f"


def test_show_skips_the_prompt(tok):
    prompt, more = "def f(x):\n    return x\n", "\ndef f(x):\n    return x\n"
    codes = tok.encode(prompt + more)
    n = len(tok.encode(prompt))
    assert cli.segments(tok, codes[:n]) == cli.segments(tok, codes)[:n]    # the split falls between two codes
    shown = cli.show(tok, codes, color=False, skip=n)
    assert unmark(shown, "⟦", "⟧") == more and "⟦" in shown.split("\n", 1)[1]   # decoded with the prompt's codebook


def test_configure_reads_flags_values_and_presets(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Settings:
        fast: bool = False      # a switch
        n: int = 1              # a number
        name: str = "a"         # a string

    preset = tmp_path / "p.py"
    preset.write_text("n = 3\nname = 'b'\n")
    cfg = Settings()
    assert cli.configure(cfg, [str(preset), "--fast", "--n=5", "rest"]) == ["rest"]
    assert (cfg.fast, cfg.n, cfg.name) == (True, 5, "b")
    cli.configure(cfg, ["--fast=False"])
    assert cfg.fast is False
    for bad, message in ((["--n"], "--n: expected --key=value"), (["--n=x"], "expected int"),
                         (["--nope"], "unknown key 'nope'")):
        with pytest.raises(ValueError, match=message):
            cli.configure(Settings(), bad)
    preset.write_text("import os\n")
    with pytest.raises(ValueError, match="only `key = literal` lines"):
        cli.configure(Settings(), [str(preset)])


def test_a_checkpoint_from_before_the_canonical_setting_loads_unmasked(tmp_path):
    # checkpoints saved before GPTConfig.canonical existed were trained with the unmasked
    # vocabulary: they load as canonical=False (and with the transformer hyper-encoder they had)
    import dataclasses

    from zip2zip import GPT, GPTConfig
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    args = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("canonical", "hyper_encoder")}
    torch.save({"model": GPT(cfg).state_dict(), "model_args": args}, tmp_path / "old.pt")
    model, _ = cli.load_checkpoint(str(tmp_path / "old.pt"))
    assert model.config.canonical is False and model.config.hyper_encoder == "transformer"
    torch.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg)}, tmp_path / "new.pt")
    assert cli.load_checkpoint(str(tmp_path / "new.pt"))[0].config.canonical is True


@pytest.mark.parametrize("bias,n_tensors", [(True, 56), (False, 31)])
def test_a_checkpoint_from_before_torchs_layernorm_and_the_derived_width_loads(tmp_path, bias, n_tensors):
    # Earlier versions had a LayerNorm of their own and wrote the derived hyper_n_embd (here 4)
    # into the config they saved. Such a checkpoint's parameter names and shapes (56 tensors with
    # biases and 31 without, counted on that code) and its model_args load the same model as one
    # saved now (hyper_n_embd=0)
    from zip2zip import GPT, GPTConfig
    cfg = GPTConfig(block_size=8, vocab_size=24, n_layer=1, n_head=2, n_embd=16, max_subtokens=3,
                    max_codebook_size=8, disabled_ids=(), tie_weights=False, bias=bias, hyper_n_head=2)
    state = GPT(cfg).state_dict()
    assert len(state) == n_tensors and ("transformer.h.0.ln_1.bias" in state) == bias
    assert state["transformer.ln_f.weight"].shape == (16,) and state["hyper_in.c_in.weight"].shape == (4, 16)
    for saved in (4, 0):
        torch.save({"model": state, "model_args": {**dataclasses.asdict(cfg), "hyper_n_embd": saved}}, tmp_path / "c.pt")
        model, _ = cli.load_checkpoint(str(tmp_path / "c.pt"))
        assert model.config.hyper_width == 4 and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
