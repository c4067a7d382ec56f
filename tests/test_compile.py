"""torch.compile on the CPU (inductor): the static decoding step compiles once, whatever the rows
and prompts, and greedy decoding gives the same codes as the eager step. Graphs are counted
with dynamo's own counters. (On a GPU the same step runs as a CUDA graph: gpu_check.sh.)"""
import re

import pytest
import torch
from torch._dynamo.utils import counters

import fastgen
import zip2zip as z
from tests.test_model import codes_of, tiny


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_the_compiled_decoding_step_builds_one_graph_and_decodes_like_eager(fresh_dynamo):
    model = tiny(n_layer=1, block_size=16)
    prompts = [codes_of(s, model, n) for s, n in ((0, 3), (1, 12))]   # ragged, and past the context
    eager = fastgen.generate(model, prompts, 24, top_k=1)
    assert fastgen.generate(model, prompts, 24, top_k=1, compile=True) == eager
    assert counters["stats"]["unique_graphs"] == 1
    # a new decoder on other prompts of the same batch size reuses it: no recompile per step,
    # per layer, per row or per prompt
    other = [codes_of(s, model, n) for s, n in ((2, 7), (3, 1))]
    assert fastgen.generate(model, other, 24, top_k=1, compile=True) == fastgen.generate(model, other, 24, top_k=1)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    # sampling is another graph (temperature and top_k are constants of the step)
    torch.manual_seed(0)
    fastgen.generate(model, prompts, 5, temperature=0.8, top_k=5, compile=True)
    assert counters["stats"]["unique_graphs"] == 2


# (config.patch, not monkeypatch: undoing a monkeypatch deletes dynamo's setting, and later tests fail)
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=4)
def test_a_compiled_training_run_builds_a_handful_of_graphs(fresh_dynamo, monkeypatch, tmp_path):
    # 8 layers in bf16 (the GPU default; the end sample decodes with a bf16 copy of the weights),
    # through training, evaluation and the end sample. Dynamo's graph count does not depend on the
    # backend, so "eager" keeps this fast; a recompile per layer or per step would hit dynamo's
    # limit (8), and fail_on_recompile_limit_hit makes that an error.
    import train
    from tests.test_train import tiny

    compile_ = torch.compile

    def eager(model=None, **kw):
        kw.pop("mode", None)
        return compile_(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager)
    data = tmp_path / "data"
    data.mkdir()
    ids = z.Tokenizer().encode_base(open(z.__file__).read())      # zip2zip.py's own text, 2/3 for training
    for split, part in (("train", ids[:len(ids) * 2 // 3]), ("val", ids[len(ids) * 2 // 3:])):
        torch.tensor([50256] + part, dtype=torch.int32).numpy().astype("uint16").tofile(data / f"{split}.bin")
    out = train.main(tiny(data, tmp_path / "out", "--compile=True", "--dtype=bfloat16", "--n_layer=8", "--max_iters=4",
                          "--eval_interval=2", "--sample_tokens=40"))   # past the context: crops too
    assert out["iter_num"] == 4
    # the blocks in training, the blocks in evaluation (no_grad: same shapes, padded), the step
    assert counters["stats"]["unique_graphs"] == 3


def test_the_compiled_step_reads_bf16_weights_and_writes_the_cache_in_place(fresh_dynamo):
    # inductor's code for the step of a model trained in fp32, decoding under bf16 autocast (train.py's
    # end sample on a GPU): it must not cast the weights at every call (it reads a bf16 copy), nor copy a
    # layer's cache (B, nh, block, hs) out and back to write one key (the step writes in place)
    from torch._inductor.utils import run_and_get_code
    model = tiny(n_layer=1, block_size=40)          # 40: no other buffer has a cache's shape
    c, prompts = model.config, [codes_of(s, model, n) for s, n in ((0, 3), (1, 12))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec, (code,) = run_and_get_code(fastgen.StaticStepper, model, prompts, temperature=0, compile=True)
        eager = fastgen.StaticStepper(model, prompts, temperature=0)
        for _ in range(3):
            torch.testing.assert_close(dec.logits, eager.logits, atol=0.1, rtol=0.02)
            dec.advance(eager.next)
            eager.advance(eager.next)
    assert counters["stats"]["unique_graphs"] == 1
    call, inputs = code[code.index("def call("):], code[code.index("def get_args("):]
    assert "torch.float32" not in inputs                                        # every weight in bf16
    assert f"empty_strided_cpu((2, {c.n_head}, 40, {c.n_embd // c.n_head})," not in call   # no copy of a cache
    assert not re.search(r"(?<!_to)_copy_", call)                              # nor of any other input (copy_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_compiled_step_decodes_like_eager(fresh_dynamo):
    # one CUDA graph replay a step (mode reduce-overhead): in fp32 (TF32 off) the eager step's greedy
    # codes; in bf16 (the step reads a bf16 copy of the weights, eager casts under autocast) logits
    # within bf16's rounding, step after step
    model = tiny(n_layer=2, block_size=16).cuda()
    prompts = [codes_of(s, model, n) for s, n in ((0, 3), (1, 12))]     # ragged, and past the context
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        compiled = fastgen.generate(model, prompts, 24, top_k=1, compile=True)
        assert compiled == fastgen.generate(model, prompts, 24, top_k=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dec = fastgen.StaticStepper(model, prompts, temperature=0, compile=True)
        eager = fastgen.StaticStepper(model, prompts, temperature=0)
        for _ in range(24):
            torch.testing.assert_close(dec.logits, eager.logits, atol=0.1, rtol=0.02)
            dec.advance(eager.next)
            eager.advance(eager.next)
