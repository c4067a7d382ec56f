"""The fast path equals the simple one: fastgen.StaticStepper (B rows, one packed static step)
against zip2zip.Stepper (one row, one code at a time), on ragged batches and past the context:
the same logits within 1e-5 in fp32, the same greedy codes."""
import random

import pytest
import torch
import torch.nn.functional as F

import fastgen
import zip2zip as z
from tests.test_model import V, codes_of, tiny


def assert_same_logits(fast, simple):
    """fast (V + C + 1,) and simple (V + n + 1,): equal on the simple one's columns, -inf beyond."""
    w = simple.size(0)
    assert torch.equal(torch.isinf(fast[:w]), torch.isinf(simple))
    fin = torch.isfinite(simple)
    torch.testing.assert_close(fast[:w][fin], simple[fin], atol=1e-5, rtol=0)
    assert torch.isinf(fast[w:]).all()


@pytest.mark.parametrize("canonical,tie,kind", [(True, True, "transformer"), (False, False, "mlp"),
                                                (True, True, "mean"), (True, True, None)])
def test_the_static_step_gives_the_simple_loops_logits(canonical, tie, kind):
    # prompts of different lengths, one longer than the context (block 16), read on past it:
    # every row is cropped on its own, at other steps
    model = tiny(block_size=16, canonical=canonical, tie_weights=tie, hyper_encoder=kind or "transformer",
                 max_subtokens=1 if kind is None else 4)
    full = [codes_of(s, model, 70) for s in range(3)]
    starts = [1, 21, 9]
    fast = fastgen.StaticStepper(model, [f[:s] for f, s in zip(full, starts)], temperature=0)
    simple = [z.Stepper(model) for _ in full]
    logits = [[s.read(code) for code in f[:n]][-1] for s, f, n in zip(simple, full, starts)]
    with torch.no_grad():
        for t in range(45):
            for b in range(3):
                assert_same_logits(fast.logits[b], logits[b])
            codes = [f[s + t] for f, s in zip(full, starts)]
            fast.advance(codes)
            logits = [s.read(code) for s, code in zip(simple, codes)]
    assert len(set(fast.filled)) == 3      # the rows were cropped at different steps


def noncanonical_codes(model, n, seed):
    """n valid codes drawn at random (hypertokens often): a stream that is not canonical, as the
    multi-view beam reads, and (the number of) its codes that install more than one entry."""
    rng, lzw, codes, several = random.Random(seed), model.codec(), [], 0
    while len(codes) < n:
        k = len(lzw.entries)
        hyper = range(V, V + k + (lzw.pending() is not None))
        codes.append(rng.choice(hyper) if hyper and rng.random() < 0.7 else rng.randrange(3))
        lzw.push(codes[-1])
        several += len(lzw.entries) - k > 1
    return codes, several


@pytest.mark.parametrize("canonical", [True, False])
def test_a_code_that_installs_several_entries(canonical):
    # A canonical code installs at most one entry, which the step writes; a code of a stream that
    # is not canonical can install more, and the rest are written before the step: the logits
    # still agree with the simple loop's (rows of either kind, side by side)
    model = tiny(block_size=64, max_codebook_size=64, canonical=canonical)
    rows = [noncanonical_codes(model, 40, seed)[0] for seed in (6, 7)] + [codes_of(0, model, 40)]
    assert all(noncanonical_codes(model, 40, seed)[1] > 0 for seed in (6, 7))   # (5 such codes)
    fast = fastgen.StaticStepper(model, [r[:1] for r in rows], temperature=0)
    simple = [z.Stepper(model) for _ in rows]
    with torch.no_grad():
        logits = [s.read(r[0]) for s, r in zip(simple, rows)]
        for t in range(1, 40):
            for b in range(len(rows)):
                assert_same_logits(fast.logits[b], logits[b])
            fast.advance([r[t] for r in rows])
            logits = [s.read(r[t]) for s, r in zip(simple, rows)]


def test_greedy_text_is_the_same_on_both_paths():
    model = tiny(block_size=16)
    prompts = [codes_of(s, model, n) for s, n in ((0, 1), (1, 12), (2, 40))]   # ragged, and past the context
    fast = fastgen.generate(model, prompts, 30, top_k=1)
    assert fast == model.generate(prompts, 30, top_k=1)
    assert any(c >= V for row, p in zip(fast, prompts) for c in row[len(p):])  # hypertokens were written
    out = fastgen.generate(model, torch.tensor([prompts[1]] * 2), 5, temperature=0)
    assert torch.is_tensor(out) and out.tolist() == model.generate([prompts[1]] * 2, 5, temperature=0)


def test_the_context_is_cropped_by_one_rule():
    # zip2zip.context_length is the rule both paths follow (the worked example of its docstring):
    # a code that finds the context full keeps block_size // 2 codes, itself included
    assert [z.context_length(n, 16) for n in (1, 16, 17, 24, 25, 26)] == [1, 16, 8, 15, 16, 8]
    model = tiny(block_size=6)
    codes = codes_of(3, model, 40)
    stepper, fast = z.Stepper(model), fastgen.StaticStepper(model, [codes[:1]])
    for n, code in enumerate(codes, 1):
        stepper.read(code)
        if n > 1:                        # the fast path has read its prompt, the first code
            fast.advance([code])
        assert stepper.context == codes[n - z.context_length(n, 6):n] and fast.filled == [len(stepper.context)], n


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3), (2.0, 2)])
def test_the_race_draws_as_the_plain_sample_does(temperature, top_k):
    # zip2zip.sample's draw by fastgen.race (no host sync) and by torch.multinomial are one distribution:
    # 20,000 draws of each land on every code within 0.02 of softmax(logits / temperature) over
    # the top_k codes (the standard error is about 0.004), masked codes never
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, float("-inf"), 0.2, 2.0, -0.5]]).repeat(20_000, 1)
    want = F.softmax(logits[0] / temperature, dim=-1)
    if top_k is not None:
        want = torch.where(want >= want.topk(top_k).values[-1], want, 0.0)
        want = want / want.sum()
    for draw in (None, fastgen.race):
        got = torch.bincount(z.sample(logits, temperature, top_k, draw), minlength=5) / logits.size(0)
        assert (got - want).abs().max() < 0.02, (draw, got, want)
        assert got[1] == 0
