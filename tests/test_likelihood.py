"""Prefix and conditional likelihood (DESIGN.md 2.2): the law (the conditional probabilities of
every next base token, and of every pair, sum to 1), a brute-force sum over every code stream,
the plain case, and what greedy means for a continuation."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
import zip2zip as z
from brute import code_streams, stream_logp
from evals import likelihood, multiview

V, C, M, D = 5, 16, 3, 4          # base ids 0..3 and one disabled id (a canonical model has no dead end)
KINDS = ["transformer", "mlp", "mean"]
EVERY_PATH = 10 ** 6              # a beam that holds every path of these short texts
# contexts after the start id D: one that is only the start, ones that end inside a possible
# hypertoken (the last code may run on into the next tokens), a KwKwK run, a wall
CONTEXTS = [[D], [D, 0, 1, 0, 1, 0, 1], [D, 0, 1, 0], [D, 2, 2, 2], [D, 0, 1, 2, 0, 1], [D, 1, 0, D, 1]]


def model_of(canonical, kind="transformer", tie=True, max_subtokens=M, seed=0):
    torch.manual_seed(seed)
    model = z.GPT(z.GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16, max_subtokens=max_subtokens,
                              max_codebook_size=C, disabled_ids=(D,), canonical=canonical, hyper_encoder=kind,
                              tie_weights=tie, hyper_n_embd=8, hyper_n_head=2))
    with torch.no_grad():   # perturbed: far from uniform, hypertokens scored unlike their parts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def cond(model, ctx, cont, beam):
    return math.exp(multiview.loglikelihood(model, ctx, cont, beam_size=beam))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("canonical,beam", [(True, 0), (True, 4), (False, EVERY_PATH)])
def test_the_law_next_tokens_and_pairs_sum_to_one(kind, canonical, beam):
    model = model_of(canonical, kind, tie=kind != "mlp")
    for ctx in CONTEXTS:
        singles = sum(cond(model, ctx, [a], beam) for a in range(V))
        assert singles == pytest.approx(1, abs=1e-5), ctx
    for ctx in CONTEXTS[1:3]:
        pairs = sum(cond(model, ctx, [a, b], beam) for a, b in itertools.product(range(V), repeat=2))
        assert pairs == pytest.approx(1, abs=1e-5), ctx


def test_an_unmasked_model_scored_canonically_breaks_the_law():
    # why the multi-view sum is needed: canonical scoring of an unmasked model loses the other spellings
    model = model_of(False)
    assert sum(cond(model, CONTEXTS[1], [a], 0) for a in range(V)) < 0.99


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_probability_equals_the_brute_force_sum(kind):
    canonical, unmasked = model_of(True, kind), model_of(False, kind)
    for ids in ([D, 0, 1, 0, 1, 0, 1], [D, 2, 2, 2, 2], [D, 0, 1, 2, 0, 1, 2, 0]):
        streams = code_streams(ids, V, C, M, (D,), prefix=True)
        assert len(streams) > 5 and any(len(z.lzw_decode(s, V, C, M, (D,))) > len(ids) for s in streams)
        for model in (canonical, unmasked):
            brute = -torch.logsumexp(torch.tensor([stream_logp(model, s) for s in streams]), 0).item()
            assert multiview.marginal_nll(model, ids, EVERY_PATH) == pytest.approx(brute, abs=1e-4)
        assert likelihood.nll(canonical, z.lzw_encode(ids, V, C, M, (D,))) == pytest.approx(
            multiview.marginal_nll(canonical, ids, EVERY_PATH), abs=1e-4)


def test_a_path_to_a_dead_end_has_probability_zero():
    # a canonical model with no disabled id can reach a position where every code is masked (V=2:
    # after the codes 0 0 1 0 the entries [0,0] and [0,1] both extend the match (0,), and there is no
    # pending id): a path of the beam that gets there has probability 0, and the multi-view sum
    # stays the canonical NLL at every beam width
    torch.manual_seed(0)
    model = z.GPT(z.GPTConfig(block_size=32, vocab_size=2, n_layer=1, n_head=2, n_embd=16, max_subtokens=3,
                              max_codebook_size=16, disabled_ids=(), canonical=True, hyper_n_embd=8,
                              hyper_n_head=2)).eval()
    for ids in ([0, 0, 1, 0, 0], [0, 0, 1, 0, 1, 0, 0, 1]):
        nll = likelihood.nll(model, z.lzw_encode(ids, 2, 16, 3, ()))
        for beam in (1, 4, EVERY_PATH):
            assert multiview.marginal_nll(model, ids, beam) == pytest.approx(nll, abs=1e-4), (ids, beam)
        assert multiview.loglikelihood(model, ids[:2], ids[2:], 4) == pytest.approx(
            likelihood.loglikelihood(model, ids[:2], ids[2:]), abs=1e-4)


def test_continuations_may_come_from_a_generator():
    model = model_of(False)
    ctx, conts = [D, 0, 1, 0], [[1, 0], [2, 2, 2]]
    expected = multiview.loglikelihoods(model, ctx, conts, beam_size=4)
    assert len(expected) == 2
    assert multiview.loglikelihoods(model, ctx, (x for x in conts), beam_size=4) == expected


def test_the_worked_example_of_the_design_notes():
    # DESIGN.md 2.2, V=100: 1 2 1 2 1 2 is written 1 2 100 100; after 1 2 100 the codes that may
    # stand last are 100 [1,2] and the pending id 102 [1,2,1]
    lzw = z.LZW(100, 64, 4)
    for code in (1, 2, 100):
        lzw.push(code)
    assert lzw.starting_with((1, 2)) == [100, 102] and lzw.starting_with((2,)) == [2, 101]
    model = model_of(True)
    codes = z.lzw_encode([D, 0, 1, 0, 1, 0, 1], V, C, M, (D,))
    assert codes[-1] >= V and len(model.last_code_choices(codes)) >= 2


def test_plain_model_loglikelihood_is_the_sum_of_token_logprobs():
    model = model_of(True, max_subtokens=1)
    ctx, cont = [D, 0, 1, 0, 1, 2], [0, 1, 1]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0][0], -1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert likelihood.loglikelihood(model, ctx, cont) == pytest.approx(expected, abs=1e-5)
    assert multiview.loglikelihood(model, ctx, cont, beam_size=3) == pytest.approx(expected, abs=1e-5)
    greedy = [logp[len(ctx) - 1 + i].argmax().item() for i in range(3)]
    assert [g for _, g in likelihood.loglikelihoods(model, ctx, [greedy[:1], cont])] == [True, greedy == cont]


@pytest.mark.parametrize("kind", KINDS)
def test_a_teacher_forced_batch_equals_each_row_alone(kind):
    # row 0 has fewer entries than the batch's K: after 1 its pending id (column 9) shares a column
    # with a pad entry, whose first base id is a child of the match there; that must not mask the
    # pending id (found by scoring continuations of different lengths together)
    model = model_of(True, kind, seed=2)
    rows = [[D, 0, 1, 5, 5, 1, 0], [D, 0, 1, 5, 5, 1, 1]]
    T = max(map(len, rows))
    with torch.no_grad():
        batch, _ = model(torch.tensor([r + [0] * (T - len(r)) for r in rows]))
        for b, r in enumerate(rows):
            alone, _ = model(torch.tensor([r]))
            W = alone.size(-1)
            torch.testing.assert_close(batch[b, :len(r), :W], alone[0], atol=1e-5, rtol=0)
            assert torch.isneginf(batch[b, :len(r), W:]).all()


def test_continuations_of_one_context_are_scored_as_one_by_one():
    model = model_of(True, "mlp")
    ctx, conts = [D, 0, 1, 0, 1], [[0], [1, 0, 1, 0, 1, 0], [3, D, 2], [2, 2, 2, 2]]
    together = likelihood.loglikelihoods(model, ctx, conts)
    assert together == [likelihood.loglikelihoods(model, ctx, [x])[0] for x in conts]
    assert [ll for ll, _ in together] == pytest.approx([likelihood.loglikelihood(model, ctx, x) for x in conts])
    with pytest.raises(ValueError, match="non-empty continuations"):
        likelihood.loglikelihoods(model, ctx, [[0], []])
    with pytest.raises(ValueError, match="base id 7"):
        likelihood.loglikelihoods(model, ctx, [[7]])


def test_a_long_context_is_read_one_code_at_a_time():
    model = model_of(True, seed=1)
    ctx = [D] + [0, 1, 2, 3] * 30          # ~40 codes: past block_size=32, replayed with the crop
    assert len(z.lzw_encode(ctx, V, C, M, (D,))) > 33
    total = sum(cond(model, ctx, [a], 0) for a in range(V))
    assert total == pytest.approx(1, abs=1e-5)
    # continuations on both sides of the context's end, read together: each as alone
    ctx = [D] + [0, 1, 2, 3] * 16
    conts = [[0], [0, 1, 2, 3, 3, 2, 1, 0] * 6, [2, 2]]
    lengths = [len(z.lzw_encode(ctx + x, V, C, M, (D,))) for x in conts]
    assert min(lengths) <= 33 < max(lengths)
    together = likelihood.loglikelihoods(model, ctx, conts)
    assert together == [likelihood.loglikelihoods(model, ctx, [x])[0] for x in conts]


def greedy_reference(model, ctx, steps):
    """Greedy decoding conditioned on the context (DESIGN.md 2.3), step by step with the decoder:
    read the context's codes but its last; choose the most probable code that spells the context's
    end; then the most probable code at every step. Returns the base ids written after ctx."""
    args = (V, C, M, (D,))
    head = z.lzw_encode(ctx, *args)
    dec = fastgen.StaticStepper(model, [head[:-1]], temperature=0)
    allowed = model.last_code_choices(head)
    codes = head[:-1] + [allowed[dec.logits[0, allowed].argmax().item()]]
    for _ in range(steps):
        dec.advance([codes[-1]])
        codes.append(dec.logits[0].argmax().item())
    return z.lzw_decode(codes, *args)[len(ctx):]


@pytest.mark.parametrize("kind", KINDS)
def test_is_greedy_is_greedy_decoding_from_the_context(kind):
    model = model_of(True, kind, seed=2)
    for ctx in CONTEXTS[1:]:
        written = greedy_reference(model, ctx, 6)
        for j in range(1, 6):
            cont = written[:j]
            wrong = cont[:-1] + [(cont[-1] + 1) % V]
            assert [g for _, g in likelihood.loglikelihoods(model, ctx, [cont, wrong])] == [True, False], (ctx, cont)
