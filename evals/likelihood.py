"""
The likelihood of a text under a zip2zip model (DESIGN.md 2.2 and 2.3), for any trained GPT:
conditional likelihoods of continuations given a context (what lm-eval's loglikelihood asks),
and the NLL and bytes of a whole text (bits per byte). Exact for a canonical model; multiview.py
sums the same quantities over segmentations, for any model (DESIGN.md 5).

All rest on the prefix probability (nll below, with zip2zip.GPT.last_code_choices): a model writes
on past any text, so the likelihood of a text is the probability that the model's base tokens
*start with* it, and at the text's last code every valid code that spells the rest of it and may
run past it counts.

    from evals import likelihood
    likelihood.loglikelihood(model, context_ids, continuation_ids)   # log P(continuation | context)
    likelihood.score(model, "def f(x):", tokenizer)                    # (NLL in nats, UTF-8 bytes)
    likelihood.nll(model, codes)                                       # -log P_prefix of a code stream
"""

import torch
from torch.nn import functional as F

from lib.checks import as_ids, check_base_ids
from zip2zip import Stepper, lzw_encode


@torch.no_grad()
def next_logprobs(model, codes):
    """The next code's log-distribution after each of `codes`, in order: from one forward pass
    when they fit the context, else one at a time from a zip2zip.Stepper, which crops the context
    as generation does (so a long text never holds all of its log-probs at once)."""
    if len(codes) <= model.config.block_size:
        yield from F.log_softmax(model(torch.tensor([codes], device=model.device))[0][0].float(), dim=-1)
        return
    stepper = Stepper(model)
    for code in codes:
        yield F.log_softmax(stepper.read(code).float(), dim=-1)


def nll(model, codes, prefix=True):
    """Negative log-likelihood (nats) of codes[1:] given codes[0], one sequence. prefix=True:
    that the model's text starts with theirs (DESIGN.md 2.2: the last term sums every code
    that may stand at the last position); prefix=False: of exactly this finished stream."""
    codes = as_ids(codes, "codes")
    if len(codes) < 2:
        return 0.0
    last, total = model.last_code_choices(codes) if prefix else codes[-1:], 0.0
    for t, logp in enumerate(next_logprobs(model, codes[:-1]), 1):     # logp: code t's log-distribution
        total = total - (logp[codes[t]] if t < len(codes) - 1 else logp[last].logsumexp(0))
    return total.item()


@torch.no_grad()
def code_logprobs(model, rows, keep):
    """Teacher-force each row of codes. Returns, per row, (lp, dist): lp (n-1,) the log-prob of
    code t given the codes before it, t = 1..n-1; dist (n - keep, W) the whole next-code
    log-distribution at positions t = keep..n-1 (the row's keep). Rows that fit the context
    share one forward pass; a longer row is read by next_logprobs, which crops it as
    generation does."""
    c, out = model.config, []
    short = [i for i, r in enumerate(rows) if len(r) <= c.block_size + 1]
    if short:
        T = max(len(rows[i]) for i in short) - 1
        x = torch.tensor([rows[i][:-1] + [0] * (T + 1 - len(rows[i])) for i in short], device=model.device)
        logp = F.log_softmax(model(x)[0].float(), dim=-1)                  # (B, T, W)
    width = c.vocab_size + (c.max_codebook_size + 1 if c.has_hypertokens else 0)   # every long row's
    for i, (row, k) in enumerate(zip(rows, keep)):
        n = len(row)
        if i in short:
            lp = logp[short.index(i), :n - 1]                               # (n - 1, W): position t at t - 1
            out.append((lp.gather(-1, torch.tensor(row[1:], device=lp.device)[:, None])[:, 0], lp[k - 1:]))
            continue
        lp, dist = [], []
        for t, step_logp in enumerate(next_logprobs(model, row[:-1]), 1):    # (V + n_t + 1,): code t's
            lp.append(step_logp[row[t]])
            dist += [F.pad(step_logp, (0, width - step_logp.size(0)), value=float("-inf"))] if t >= k else []
        out.append((torch.stack(lp), torch.stack(dist)))
    return out


@torch.no_grad()
def loglikelihoods(model, context, continuations):
    """[(log P(continuation | context) in nats, is_greedy)] for several continuations of one
    context (lists of base ids; the context's first id is the start, as in nll).

    log P(cont | ctx) = log P_prefix(ctx + cont) - log P_prefix(ctx) (DESIGN.md 2.2): exact for
    a canonical model (multiview.loglikelihoods sums over segmentations, for any model).
    is_greedy (DESIGN.md 2.3): along the canonical codes of ctx + cont, from the context's last
    code on, each code is a most probable one there (at the context's last code, among the
    codes that spell the context's end; at the last, any code that spells the rest of the text
    counts). All continuations are read in one forward pass, which also gives P_prefix(ctx):
    the streams share the codes before the context's last one.
    """
    c = model.config
    ctx, conts = as_ids(context, "context"), [as_ids(x, "continuation") for x in continuations]
    if not ctx or not conts or not all(conts):
        raise ValueError("loglikelihood needs a context of at least one id (the start) and non-empty continuations")
    for ids in [ctx] + conts:
        check_base_ids(ids, c.vocab_size)
    args = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
    head, rows = lzw_encode(ctx, *args), [lzw_encode(ctx + x, *args) for x in conts]
    k = len(head)                            # the context's last code stands at position k - 1
    spell_ctx = model.last_code_choices(head) if k > 1 else None
    out = []
    for row, (lp, dist) in zip(rows, code_logprobs(model, rows, [max(k - 1, 1)] * len(rows))):
        n, spell_all = len(row), model.last_code_choices(row)
        assert row[:k - 1] == head[:k - 1], "DESIGN.md 2.2: the streams share the codes before the context's last"
        logp = lp[max(k - 2, 0):n - 2].sum() + dist[-1, spell_all].logsumexp(0)   # positions k-1 .. n-2, then n-1
        if k > 1:
            logp = logp - dist[0, spell_ctx].logsumexp(0)
        # a tie for the most probable counts as greedy, to float rounding: an exact tie (the mean
        # encoder embeds [t, t] as t) can come out either way in the teacher-forced pass and the
        # decoding step, which round the same sums differently (seen: 1e-6 nats)
        greedy = True
        for t in range(max(k - 1, 1), n):
            step = dist[t - max(k - 1, 1)]
            best = step[spell_ctx].max() if t == k - 1 else step.max()
            greedy &= bool(step[spell_all if t == n - 1 else row[t]].max() >= best - 1e-5)
        out.append((logp.item(), greedy))
    return out


def loglikelihood(model, context, continuation):
    """log P(continuation | context) in nats (base ids; see loglikelihoods)."""
    return loglikelihoods(model, context, [continuation])[0][0]


def text_ids(model, text, tokenizer):
    """<|endoftext|> and the base ids of a text, once the tokenizer is checked to be the model's."""
    c = model.config
    settings = (tokenizer.vocab_size, tokenizer.max_codebook_size, tokenizer.max_subtokens)
    if settings != (c.vocab_size, c.max_codebook_size, c.max_subtokens) or \
            tokenizer.disabled_ids != frozenset(c.disabled_ids):
        raise ValueError(f"tokenizer (V, C, M) = {settings} and disabled ids do not match the model's "
                         f"{(c.vocab_size, c.max_codebook_size, c.max_subtokens)}")
    return [tokenizer.eot] + tokenizer.encode_base(text)


def score(model, text, tokenizer):
    """(NLL in nats, UTF-8 bytes) of a text after an <|endoftext|>: the prefix NLL of its canonical
    codes (DESIGN.md 2.2; multiview.score sums over segmentations). bits per byte = nll / (ln 2
    * bytes): the same text gives comparable numbers for a plain and a zip2zip model, whatever
    their codes."""
    c = model.config
    codes = lzw_encode(text_ids(model, text, tokenizer), c.vocab_size, c.max_codebook_size, c.max_subtokens,
                       c.disabled_ids)
    return nll(model, codes), len(text.encode("utf-8"))   # a literal <|endoftext|> in the text is text: 13 bytes
