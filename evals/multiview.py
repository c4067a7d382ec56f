"""
The multi-view likelihood of a text (DESIGN.md 5): the probability that a model's text starts
with it, summed over the code streams that spell it, for any zip2zip model: marginal_nll,
loglikelihoods and score, the multi-view forms of likelihood.nll, loglikelihoods and score.

Many code streams spell the same text: the canonical one, and every one that writes a run of base
tokens in smaller pieces than the greedy encoder would. An unmasked model (canonical=False)
spreads probability over all of them, so the canonical stream's NLL only bounds -log P(text)
from above; the paper's authors answered reviewers with an approximate "multi-view perplexity".
Here the streams are searched exactly, with a beam: the NLL found is an upper bound on
-log P(text) that tightens as the beam grows, and is exact when nothing is pruned. For a
canonical model (canonical=True) only the canonical stream is finite, and this is its NLL.

Every stream that has read the base tokens ids[:p] holds the same codebook (the encoder's over
those tokens, DESIGN.md 1.1), so the valid next codes at text position p are the same on every
path: the base id ids[p], each installed entry that matches the text ahead, and the pending id if
its content does. A path ends with the code that spells the last tokens of the text and may run
past them (DESIGN.md 2.2): the text goes on, and any continuation counts. Paths are grouped by
text position; at each position the beam_size most probable are kept and extended, all of them
in one batched step of fastgen.StaticStepper.
"""

import torch
from torch.nn import functional as F

from evals import likelihood
from fastgen import StaticStepper, gather_rows
from lib.checks import as_ids, check_base_ids


def lattice(model, ids, ends):
    """What may come after ids[:p], for p = 1 .. len(ids) - 1: ({p: [(code, length)]}, the codes
    that spell ids[p:p + length] and stop inside ids; {p: {e: [code]}}, for each end e of `ends`
    within M of p, the codes that spell all of ids[p:e] and may run past it (DESIGN.md 2.2))."""
    c, lzw, choices, finals = model.config, model.codec(), {}, {}
    for p in range(1, len(ids)):
        lzw.feed(ids[p - 1:p], [])                       # the codebook after ids[:p]
        choices[p], code = [], ids[p]
        for length in range(1, min(c.max_subtokens, len(ids) - 1 - p) + 1):
            if length > 1:
                code = lzw.edges.get(code * c.vocab_size + ids[p + length - 1])   # the trie, one token deeper
                if code is None:
                    break
            choices[p].append((code, length))
        pend = lzw.pending()
        if pend is not None and p + len(pend) < len(ids) and tuple(ids[p:p + len(pend)]) == pend:
            choices[p].append((c.vocab_size + len(lzw.entries), len(pend)))
        finals[p] = {e: lzw.starting_with(ids[p:e]) for e in ends if 0 < e - p <= c.max_subtokens}
    return choices, finals


@torch.no_grad()
def prefix_nlls(model, ids, ends, beam_size=16):
    """For each e in ends: the NLL (nats) that the text starts with base ids[1:e], given ids[0],
    summed over the code streams the beam finds (DESIGN.md 2.2 and 5). One search serves every
    end: the paths that reach a text position are the same whichever end is asked for."""
    ids = as_ids(ids)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    check_base_ids(ids, model.config.vocab_size)
    if not all(1 <= e <= len(ids) for e in ends):
        raise ValueError(f"ends must lie in 1..{len(ids)}, got {list(ends)}")
    choices, finals = lattice(model, ids, ends)
    # paths[p]: (log-prob, stepper, row, code): a path that read ids[:p], ending with `code` read
    # on top of that stepper's row (None: the row has read it already). Greedy steppers draw nothing.
    paths, done = {1: [(0.0, StaticStepper(model, [ids[:1]], temperature=0), 0, None)]}, {e: [] for e in ends}
    for p in range(1, len(ids)):
        beam = sorted(paths.pop(p, []), key=lambda path: -path[0])[:beam_size]
        if not beam:
            continue
        if beam[0][3] is None:
            dec = beam[0][1]
        else:
            dec = gather_rows([(d, row) for _, d, row, _ in beam])
            dec.advance([code for *_, code in beam])
        logp = F.log_softmax(dec.logits.float(), dim=-1)                    # (paths, W)
        # subtle: a canonical model without a disabled id can mask every code after a path (a dead end,
        # DESIGN.md 2.1); such a path has probability 0, but log_softmax of its row is NaN: make it -inf
        logp = logp.masked_fill(logp.isnan(), float("-inf"))
        steps = logp[:, [code for code, _ in choices[p]]].tolist()          # (paths, choices)
        last = {e: logp[:, codes].logsumexp(-1).tolist() for e, codes in finals[p].items()}
        for i, (lp, *_) in enumerate(beam):
            for (code, length), step in zip(choices[p], steps[i]):
                if step > float("-inf"):
                    paths.setdefault(p + length, []).append((lp + step, dec, i, code))
            for e in last:                    # the path ends here: the code at p spells ids[p:e] and goes on
                if last[e][i] > float("-inf"):
                    done[e].append(lp + last[e][i])
    return [0.0 if e == 1 else -torch.logsumexp(torch.tensor(done[e], dtype=torch.float64), 0).item() for e in ends]


def marginal_nll(model, ids, beam_size=16):
    """Multi-view NLL (nats) that the text starts with base ids[1:], given ids[0], summed over
    the code streams that spell it (DESIGN.md 5)."""
    return prefix_nlls(model, ids, [len(ids)], beam_size)[0]


@torch.no_grad()
def loglikelihoods(model, context, continuations, beam_size=16):
    """likelihood.loglikelihoods with both prefix probabilities summed over segmentations: exact for
    any model when the beam holds every path. is_greedy is likelihood.loglikelihoods', along the
    canonical codes. beam_size 0: likelihood.loglikelihoods itself."""
    ctx = as_ids(context, "context")
    conts = [as_ids(x, "continuation") for x in continuations]   # read once: it may be a generator
    out = likelihood.loglikelihoods(model, ctx, conts)
    if beam_size == 0:
        return out
    return [(nll_ctx - nll_all, greedy) for x, (_, greedy) in zip(conts, out)
            for nll_ctx, nll_all in [prefix_nlls(model, ctx + x, [len(ctx), len(ctx) + len(x)], beam_size)]]


def loglikelihood(model, context, continuation, beam_size=16):
    """log P(continuation | context) in nats, summed over segmentations (see loglikelihoods)."""
    return loglikelihoods(model, context, [continuation], beam_size)[0][0]


def score(model, text, tokenizer, beam_size=16):
    """likelihood.score with the NLL summed over segmentations: (NLL in nats, UTF-8 bytes).
    beam_size 0: likelihood.score itself."""
    if beam_size == 0:
        return likelihood.score(model, text, tokenizer)
    return marginal_nll(model, likelihood.text_ids(model, text, tokenizer), beam_size), len(text.encode("utf-8"))
