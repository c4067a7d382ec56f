"""torch.compile on the CPU (inductor): the static decoding step compiles once, whatever the rows
and prompts, and greedy decoding gives the same codes as the eager step. Graphs are counted
with dynamo's own counters. (On a GPU the same step runs as a CUDA graph: gpu_check.sh.)"""
import pytest
import torch
from torch._dynamo.utils import counters

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
    eager = model.generate(prompts, 24, top_k=1)
    assert model.generate(prompts, 24, top_k=1, compile=True) == eager
    assert counters["stats"]["unique_graphs"] == 1
    # a new decoder on other prompts of the same batch size reuses it: no recompile per step,
    # per layer, per row or per prompt
    other = [codes_of(s, model, n) for s, n in ((2, 7), (3, 1))]
    assert model.generate(other, 24, top_k=1, compile=True) == model.generate(other, 24, top_k=1)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    # sampling is another graph (temperature and top_k are constants of the step)
    torch.manual_seed(0)
    model.generate(prompts, 5, temperature=0.8, top_k=5, compile=True)
    assert counters["stats"]["unique_graphs"] == 2
