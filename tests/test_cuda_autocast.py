"""The bf16 path as CUDA runs it, on the CPU (tests/cuda_autocast.py emulates CUDA autocast's
float32 list): training, the step-0 evaluation, both decoding paths, the multi-view sum and the
harness run, the logits stay bf16, and no fp32 copy of them is made. Every hyper-encoder,
canonical and not, and the plain model (M=1)."""
import math
import os

import pytest
import torch

import fastgen
from evals import multiview
import train
import zip2zip as z
from cuda_autocast import cuda_autocast
from test_model import stream

V, C, M, EOT = 512, 12, 4, 23     # V wider than any hidden size: a tensor this wide is logits
CONFIGS = {"transformer": {}, "mlp": dict(hyper_encoder="mlp"), "mean": dict(hyper_encoder="mean"),
           "unmasked": dict(canonical=False), "plain": dict(max_subtokens=1)}


def model_of(name, **kw):
    torch.manual_seed(0)
    args = dict(block_size=48, vocab_size=V, n_layer=2, n_head=2, n_embd=32, max_subtokens=M,
                max_codebook_size=C, disabled_ids=(EOT,), dropout=0.0, hyper_n_embd=16, hyper_n_head=2)
    model = z.GPT(z.GPTConfig(**{**args, **CONFIGS[name], **kw}))
    with torch.no_grad():   # a trained-looking hyper-encoder (its output projection starts at 0)
        for enc in {getattr(model, "hyper_in", None), getattr(model, "hyper_out", None)} - {None}:
            if hasattr(enc, "proj"):
                enc.proj.weight.normal_(std=0.2)
    return model


def codes(model, seed, n=49):
    c = model.config
    return z.lzw_encode(stream(seed), V, c.max_codebook_size, c.max_subtokens, c.disabled_ids)[:n]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_training_step_and_the_evaluation(name):
    model = model_of(name).train()
    rows = [codes(model, s) for s in (0, 1)]
    idx, tgt = torch.tensor([r[:-1] for r in rows]), torch.tensor([r[1:] for r in rows])
    with cuda_autocast(V) as seen:
        logits, loss = model(idx, tgt)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and seen.fp32_copies == [], seen.fp32_copies
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                              if p.grad is not None)
    windows = [(codes(model, s), 48, 100) for s in (2, 3, 4)]       # (codes, base tokens, bytes)
    with cuda_autocast(V, autocast=False) as seen:
        m = train.estimate_loss(model, windows, 2, torch.autocast("cpu", dtype=torch.bfloat16))
    assert math.isfinite(m["bpb"]) and seen.fp32_copies == [], seen.fp32_copies


@pytest.mark.parametrize("name", CONFIGS)
def test_both_decoding_paths_and_the_multiview_sum(name):
    model = model_of(name).eval()
    prompts = [codes(model, 0, 5), codes(model, 1, 30)]
    with cuda_autocast(V):
        assert z.Stepper(model).read(prompts[0][0]).dtype == torch.bfloat16
        assert len(model.generate(prompts, 20, top_k=1)[1]) == 50
        dec = fastgen.StaticStepper(model, prompts)
        assert dec.logits.dtype == torch.bfloat16
        assert len(fastgen.generate(model, prompts, 20, temperature=0.8, top_k=5)[0]) == 25
        ids = z.lzw_decode(prompts[1], V, C, model.config.max_subtokens, (EOT,))
        nll = multiview.marginal_nll(model, ids, beam_size=4)
        (lp, _), = multiview.loglikelihoods(model, ids[:10], [ids[10:20]], beam_size=4)
    assert math.isfinite(nll) and math.isfinite(lp)


def test_train_py_in_bf16(tmp_path):
    # the training step, the step-0 evaluation and the end sample (fastgen) as train.py runs them
    from test_train import FILES, STDLIB, tiny
    tok = z.Tokenizer()
    data = tmp_path / "data"
    data.mkdir()
    docs = [open(os.path.join(STDLIB, f), encoding="utf-8").read() for f in FILES[:4]]
    for split, part in (("train", docs[:3]), ("val", docs[3:])):
        ids = [t for doc in part for t in [tok.eot] + tok.bpe.encode_ordinary(doc)]
        torch.tensor(ids, dtype=torch.int32).numpy().astype("uint16").tofile(data / f"{split}.bin")
    with cuda_autocast(tok.vocab_size, autocast=False) as seen:    # train.py enters autocast itself
        out = train.main(tiny(data, tmp_path / "out", "--device=cpu", "--dtype=bfloat16", "--max_iters=2",
                              "--sample_tokens=8"))
    assert out["iter_num"] == 2 and math.isfinite(out["val"]["bpb"]) and seen.fp32_copies == [], seen.fp32_copies


def test_the_harness_in_bf16(tmp_path):
    pytest.importorskip("lm_eval")
    from evals import harness
    from lm_eval.api.instance import Instance
    from test_harness import save
    lm = harness.Zip2Zip(save(tmp_path / "ckpt.pt"), device="cpu", batch_size=2, dtype="bfloat16")
    req = lambda kind, *args: Instance(request_type=kind, doc={}, arguments=args, idx=0)
    with cuda_autocast(lm.model.config.vocab_size, autocast=False):     # the harness enters autocast itself
        scores = lm.loglikelihood([req("loglikelihood", "def f(x):\n    return", " x + 1")])
        rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", "import os\nimport sys\n")])
        text = lm.generate_until([req("generate_until", "def f(", {"until": ["\n"], "max_gen_toks": 8})])
    assert math.isfinite(scores[0][0]) and math.isfinite(rolling[0]) and isinstance(text[0], str)
