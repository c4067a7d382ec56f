"""Brute-force references the tests compare the model against: every code stream of a text,
enumerated without the beam or the KV cache, and a stream's log-probability by one teacher-forced
forward pass."""
import copy

import torch
import torch.nn.functional as F

import zip2zip as z


def code_streams(ids, vocab_size, max_codebook_size, max_subtokens, disabled_ids, prefix=False):
    """Every valid code stream that starts with ids[0] and spells ids (prefix=True: whose text
    starts with ids, the last code possibly running past it): at each point try every code the
    decoder accepts and keep those that agree with the text ahead."""
    out = []

    def extend(lzw, p, codes):
        if p == len(ids) and not prefix:
            out.append(codes)
        for x in range(vocab_size + len(lzw.entries) + 1):
            try:
                content = list(lzw.resolve(x))
            except ValueError:
                continue
            if content[:len(ids) - p] != ids[p:p + len(content)] or (not prefix and p + len(content) > len(ids)):
                continue
            if prefix and p + len(content) >= len(ids):
                out.append(codes + [x])
            else:
                nxt = copy.deepcopy(lzw)
                nxt.push(x)
                extend(nxt, p + len(content), codes + [x])
    lzw = z.LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids)
    lzw.push(ids[0])
    extend(lzw, 1, ids[:1])
    return out


def stream_logp(model, codes):
    """log P(codes[1:] | codes[0]) by one teacher-forced forward pass: no beam, no KV cache."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([codes[:-1]]))
        return F.log_softmax(logits, -1)[0].gather(-1, torch.tensor(codes[1:])[:, None]).sum().item()
