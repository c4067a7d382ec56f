"""evals/harness.py: the lm-eval model `zip2zip` on a tiny checkpoint, offline. Its requests equal
likelihood.loglikelihoods on lm-eval's context/continuation split, rolling scores equal the prefix NLL,
generation stops where it should and is greedy decoding conditioned on the context, and a tiny
task runs end to end through lm_eval.simple_evaluate. Skipped where lm-eval is not installed."""
import dataclasses
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import train  # noqa: E402
from evals import harness, likelihood  # noqa: E402
from lib import loader  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from zip2zip import GPT, GPTConfig, lzw_decode, lzw_encode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(path, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, block_size=64, hyper_n_embd=16, hyper_n_head=2), **kw})
    model = GPT(cfg)
    with torch.no_grad():   # far from uniform, and a hypertoken [t, t] unlike t: no ties for greedy
        model.transformer.wte.weight.mul_(20)
        model.hyper_in.proj.weight.normal_(std=0.5)
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(cfg)}, path)
    return str(path)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return harness.Zip2Zip(save(tmp_path_factory.mktemp("out") / "ckpt.pt"), device="cpu", batch_size=3)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_the_split_is_lm_evals(lm):
    tok = lm.tok
    ctx, cont = lm.split("Question: what is 2 + 2? Answer: ", "4")    # the space moves to the continuation
    assert tok.decode_base(cont) == " 4" and ctx[0] == tok.eot
    assert ctx[1:] + cont == tok.encode_base("Question: what is 2 + 2? Answer: 4")
    ctx, cont = lm.split("", "hello world")                            # empty context: the start alone
    assert ctx == [tok.eot] and cont == tok.encode_base("hello world")
    ctx, cont = lm.split("x =  ", "1")     # without the move the split would leave "  " in the context
    assert tok.decode_base(ctx[1:]) == "x =" and tok.decode_base(cont) == "  1"
    ctx, cont = lm.split("ab", "c")   # one BPE token together ("abc"): the continuation keeps a token
    assert len(cont) >= 1 and tok.decode_base(ctx[1:] + cont) == "abc"


def test_loglikelihood_requests_equal_the_model_and_share_a_context(lm, monkeypatch):
    pairs = [("def f(x):\n    return", " x"), ("def f(x):\n    return", " x + 1"), ("def f(x):\n    return", " None"),
             ("def f(x):\n    return", " f(x)"), ("x = 1\ny =", " 2")]
    calls = []
    real = likelihood.loglikelihoods
    monkeypatch.setattr(likelihood, "loglikelihoods", lambda *a: calls.append(a) or real(*a))
    got = lm.loglikelihood([req("loglikelihood", *p) for p in pairs])
    # one call per context and per batch of 3 continuations: (4 choices -> 3 + 1) + 1
    assert [len(c[2]) for c in calls] == [3, 1, 1]
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ids, cont_ids = lm.split(ctx, cont)
        assert ll == pytest.approx(likelihood.loglikelihood(lm.model, ids, cont_ids), abs=1e-5) and ll < 0
        assert greedy == likelihood.loglikelihoods(lm.model, ids, [cont_ids])[0][1]


def test_rolling_is_the_prefix_nll_of_the_whole_document(lm):
    c, tok = lm.model.config, lm.tok
    doc = "def f(x):\n    return x\n" * 30           # far past the context of 64 codes
    ids = [tok.eot] + tok.encode_base(doc)
    codes = lzw_encode(ids, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
    assert len(codes) > c.block_size + 1
    short = "x = 1\n"
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", doc), req("loglikelihood_rolling", short)])
    assert got[0] == pytest.approx(-likelihood.nll(lm.model, codes), rel=1e-6)
    short_codes = lzw_encode([tok.eot] + tok.encode_base(short), c.vocab_size, c.max_codebook_size, c.max_subtokens,
                             c.disabled_ids)
    assert got[1] == pytest.approx(-likelihood.nll(lm.model, short_codes))


def greedy_base_ids(model, tok, context, n):
    """Greedy decoding conditioned on the context, by hand (DESIGN.md 2.3): the first code among
    those that spell the context's end, then the most probable code, n steps."""
    c = model.config
    args = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
    ids = [tok.eot] + tok.encode_base(context)
    head = lzw_encode(ids, *args)
    with torch.no_grad():
        codes = head                          # an empty context: the start, then greedy
        if len(head) > 1:
            allowed = model.last_code_choices(head)
            logits = model(torch.tensor([head[:-1]]))[0][0, -1]
            codes = head[:-1] + [allowed[logits[allowed].argmax().item()]]
        for _ in range(n):
            codes.append(model(torch.tensor([codes]))[0][0, -1].argmax().item())
    return lzw_decode(codes, *args)[len(ids):]


def test_generation_is_greedy_decoding_from_the_context_and_stops(lm):
    tok = lm.tok
    # the last two end inside a longer hypertoken, which this model prefers to the context's own
    # last code: the first code written spells the context's end and goes on (DESIGN.md 2.3)
    contexts = ["def f(x):\n    return x\n\ndef g(x):\n    return", "", "x x x x x x", "ab ab ab ab ab"]
    outs = lm.generate_until([req("generate_until", ctx, {"until": [], "max_gen_toks": 6}) for ctx in contexts])
    for ctx, text in zip(contexts, outs):
        expected = greedy_base_ids(lm.model, tok, ctx, 8)[:6]
        assert text == tok.decode_base(expected)[:len(text)] and len(tok.encode_base(text)) <= 7
        if "<|endoftext|>" not in tok.decode_base(expected):
            assert text == tok.decode_base(expected)
    # a stop string cuts the text before it; one that never comes leaves max_gen_toks base tokens
    full = outs[0]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = lm.generate_until([req("generate_until", contexts[0], {"until": [stop], "max_gen_toks": 6})])[0]
    assert stop and cut == full[:full.index(stop)]


def test_generation_batches_only_requests_of_the_same_settings(lm):
    # lm-eval hands over every task's requests in one call: a greedy request behind a sampling one
    # (one batch of 3) must stay greedy, and the order of the answers is the order of the requests
    ctx, greedy = "def f(x):\n    return x\n\ndef g(x):\n    return", {"until": [], "max_gen_toks": 6}
    alone = lm.generate_until([req("generate_until", ctx, greedy)])[0]
    hot = {"until": [], "max_gen_toks": 6, "temperature": 1000.0, "do_sample": True}
    torch.manual_seed(0)
    outs = lm.generate_until([req("generate_until", ctx, hot), req("generate_until", ctx, greedy),
                              req("generate_until", "x = 1", greedy)])
    assert outs[0] != alone and outs[1] == alone
    assert outs[2] == lm.generate_until([req("generate_until", "x = 1", greedy)])[0]


def test_an_empty_continuation_has_probability_one(lm):
    # nothing follows any context with probability 1; the context's own last token is not scored
    contexts = ["The answer is", "The answer is ", ""]
    got = lm.loglikelihood([req("loglikelihood", c, "") for c in contexts] + [req("loglikelihood", "x =", " 1")])
    assert got[:3] == [(0.0, True)] * 3
    assert got[3] == lm.loglikelihood([req("loglikelihood", "x =", " 1")])[0]


def test_a_tiny_task_runs_through_simple_evaluate(lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    docs = [{"query": "def f(x):\n    return", "choices": [" x", " y", " f"], "label": 0},
            {"query": "for i in", "choices": [" range(3):", " [1, 2]:"], "label": 1}]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: query\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path),
                                  include_defaults=False), log_samples=True)
    samples = out["samples"]["tiny_mc"]
    for s in samples:
        doc = s["doc"]
        args = [tuple(a) for a in s["arguments"]]
        assert args == [(doc["query"], " " + ch) for ch in doc["choices"]]   # lm-eval's target delimiter
        lls = [likelihood.loglikelihood(lm.model, *lm.split(*a)) for a in args]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(lls, abs=1e-5)
        assert s["acc"] == float(int(np.argmax(lls)) == doc["label"])
    assert out["results"]["tiny_mc"]["acc,none"] == np.mean([s["acc"] for s in samples])


def test_bits_per_byte_agree_with_train_py(tmp_path):
    # the rolling task's documents are train.py's validation windows: lm-eval's bits per byte
    # of a model is train.py's evaluation of the same text (a window without a literal
    # <|endoftext|>, which lm-eval counts as 13 bytes of text and train.py as a separator)
    path = os.path.join(ROOT, "data", "pycode", "val.bin")
    if not os.path.exists(path):
        pytest.skip("data/pycode/val.bin is absent (python data/pycode/prepare.py makes it)")
    with open(os.path.join(ROOT, "tasks", "pycode_bpb.jsonl")) as f:
        docs = [json.loads(line) for line in f][:6]
    docs = [d for d in docs if d["n_eot"] == 0 and d["bytes_match"]][:3]
    val = np.memmap(path, dtype=np.uint16, mode="r")
    lm = harness.Zip2Zip(save(tmp_path / "ckpt.pt", block_size=256), device="cpu")
    windows = loader.eval_windows(val, 96, 256, lm.model.config, lm.tok.byte_lengths, [d["window"] for d in docs])
    if [w[2] for w in windows] != [d["n_bytes"] for d in docs]:
        pytest.skip("this val.bin is not the one the shipped task was made from")
    ours = train.estimate_loss(lm.model, windows, 3, torch.no_grad())["bpb"]
    lls = lm.loglikelihood_rolling([req("loglikelihood_rolling", d["text"]) for d in docs])
    theirs = -sum(lls) / (math.log(2) * sum(len(d["text"].encode()) for d in docs))
    assert theirs == pytest.approx(ours, rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--tasks=no_such_task"], "--tasks=no_such_task: unknown task 'no_such_task'; the offline ones are"),
    (["--limit=-1"], "--limit=-1: expected 0 (all) or more"),
    (["--out_dir=/nonexistent"], "no checkpoint at '/nonexistent'"),
    (["--output=/nonexistent/folder/x.json"], "--output=/nonexistent/folder/x.json: no folder '/nonexistent/folder'"),
    (["--max_second=3"], "--max_second=3: unknown key 'max_second'; --help lists the settings"),
    (["--beam_sise=3"], "--beam_sise=3: unknown key 'beam_sise'; did you mean --beam_size?")])
def test_clear_errors(args, message, capsys, tmp_path, monkeypatch):
    # every setting is checked before any task runs: a bad --output costs one line, not the run
    import lm_eval
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: pytest.fail("a task ran before the checks"))
    if not any(a.startswith("--out_dir") for a in args):
        args = [f"--out_dir={save(tmp_path / 'ckpt.pt')}"] + args
    with pytest.raises(SystemExit) as e:
        harness.main(args)
    assert str(e.value).startswith("error: " + message) and "\n" not in str(e.value)


def test_a_task_whose_data_cannot_be_had_is_one_line(tmp_path, monkeypatch):
    # like --tasks=hellaswag without network: which task, which dataset, what to do (no download is tried:
    # datasets' own error for it is raised in its place)
    import datasets
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someone/some_data\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: [a, b]\nmetric_list:\n  - metric: acc\n")

    def unreachable(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(harness, "TASKS", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        harness.main([f"--out_dir={save(tmp_path / 'ckpt.pt')}", "--tasks=hub_task"])
    message = str(e.value)
    assert message.startswith("error: --tasks=hub_task: cannot load its data (someone/some_data): Couldn't reach")
    assert "network" in message and "Hugging Face cache" in message and "zip2zip_code_mc" in message
    assert "\n" not in message


def test_lm_evals_chatter_is_quiet_unless_verbose(capsys):
    import logging
    import warnings

    def chatter():
        logging.getLogger("lm_eval.evaluator").warning("Overwriting default num_fewshot")
        print("bootstrapping for stddev: perplexity")
        warnings.warn("a warning of lm-eval's")
        sys.stderr.write("a progress bar\n")
    with harness.quiet(verbose=False):
        chatter()
    assert capsys.readouterr() == ("", "")
    with pytest.raises(KeyError), harness.quiet(verbose=False):   # a bug: what was printed is shown with it
        chatter()
        raise KeyError("bug")
    assert "bootstrapping" in capsys.readouterr().err
    with pytest.warns(UserWarning), harness.quiet(verbose=True):
        chatter()
    out, err = capsys.readouterr()
    assert "bootstrapping" in out and "a progress bar" in err


def test_the_command_runs_a_shipped_task(tmp_path, capsys):
    ckpt = save(tmp_path / "ckpt.pt")
    harness.main([f"--out_dir={ckpt}", "--tasks=zip2zip_prose_cloze,zip2zip_pycode_bpb", "--limit=2",
                  f"--output={tmp_path / 'out.json'}"])
    out, err = capsys.readouterr()
    assert "zip2zip_prose_cloze" in out and "bits_per_byte" in out and "seconds: zip2zip_prose_cloze" in out
    assert err == "" and "bootstrapping" not in out     # lm-eval's chatter is kept out of sight
    saved = json.loads((tmp_path / "out.json").read_text())
    assert set(saved["seconds"]) == {"zip2zip_prose_cloze", "zip2zip_pycode_bpb"}
    assert 0 < saved["results"]["zip2zip_pycode_bpb"]["bits_per_byte,none"] < 30
