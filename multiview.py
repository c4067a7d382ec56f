"""
The multi-view likelihood of a text (DESIGN.md 5): its probability summed over the code streams
that decode to it, for any zip2zip model (GPT.marginal_nll calls marginal_nll here).

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
its content does. Paths are grouped by text position; at each position the beam_size most
probable are kept and extended, all of them in one batched step of the KV-cached decoder.
"""

import torch
from torch.nn import functional as F

from zip2zip import Decoder, as_ids, check_base_ids, decode_step


def lattice(model, ids):
    """{p: [(code, length)]}: the codes that may come after ids[:p] and spell ids[p:p + length]."""
    c, lzw, choices = model.config, model.codec(), {}
    for p in range(1, len(ids)):
        lzw.feed(ids[p - 1:p], [])                       # the codebook after ids[:p]
        choices[p], code = [(ids[p], 1)], ids[p]
        for length in range(2, min(c.max_subtokens, len(ids) - p) + 1):
            code = lzw.edges.get(code * c.vocab_size + ids[p + length - 1])   # the trie, one token deeper
            if code is None:
                break
            choices[p].append((code, length))
        pend = lzw.pending()
        if pend is not None and tuple(ids[p:p + len(pend)]) == pend:
            choices[p].append((c.vocab_size + lzw.n_entries, len(pend)))
    return choices


def gather_rows(parts):
    """A new (eager) decoder of the rows (decoder, row) in `parts`, in order."""
    new, d0 = Decoder.__new__(Decoder), parts[0][0]
    new.__dict__.update(d0.__dict__, step=decode_step)
    per_row = ("k", "v", "table_in", "table_out", "trie")     # the rest of the state is shared
    new.state = {t: torch.cat([d.state[t][r:r + 1] for d, r in parts]) if t in per_row else x
                 for t, x in d0.state.items()}
    if "table_out" in new.state and d0.state["table_out"] is d0.state["table_in"]:
        new.state["table_out"] = new.state["table_in"]
    new.state["rows"] = torch.arange(len(parts), device=d0.model.device)[:, None]
    new.rows = [list(d.rows[r]) for d, r in parts]
    new.lzw = [d.lzw[r].copy() for d, r in parts]
    new.filled = [d.filled[r] for d, r in parts]
    new.logits = torch.cat([d.logits[r:r + 1] for d, r in parts])
    return new


@torch.no_grad()
def marginal_nll(model, ids, beam_size=16):
    """NLL (nats) of base ids[1:] given ids[0], summed over the code streams that spell them."""
    ids = as_ids(ids)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    check_base_ids(ids, model.config.vocab_size)
    if len(ids) < 2:
        return 0.0
    choices = lattice(model, ids)
    # paths[p]: (log-prob, decoder, row, code): a path that read ids[:p], ending with `code` read
    # on top of that decoder row (None: the row has read it already). Greedy decoders draw nothing.
    paths, done = {1: [(0.0, Decoder(model, [ids[:1]], temperature=0), 0, None)]}, []
    for p in range(1, len(ids)):
        beam = sorted(paths.pop(p, []), key=lambda path: -path[0])[:beam_size]
        if not beam:
            continue
        if beam[0][3] is None:
            dec = beam[0][1]
        else:
            dec = gather_rows([(d, row) for _, d, row, _ in beam])
            dec.advance([code for *_, code in beam])
        codes = [code for code, _ in choices[p]]
        logp = F.log_softmax(dec.logits.float(), dim=-1)[:, codes].tolist()   # (paths, choices)
        for i, (lp, *_) in enumerate(beam):
            for (code, length), step in zip(choices[p], logp[i]):
                if step > float("-inf"):
                    path = (lp + step, dec, i, code)
                    (done if p + length == len(ids) else paths.setdefault(p + length, [])).append(path)
    return -torch.logsumexp(torch.tensor([lp for lp, *_ in done], dtype=torch.float64), 0).item()
