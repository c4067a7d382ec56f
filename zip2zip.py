"""
zip2zip: a GPT that grows its vocabulary while it reads and writes.

Text is first cut into GPT-2 BPE tokens ("base tokens", ids 0..V-1). Those are then compressed
online with LZW: each time a run of base tokens is seen that extends a known run, the extended
run becomes a *hypertoken* with the next free id V, V+1, ... The codebook starts empty for every
text and is rebuilt by the reader from the codes alone, so nothing but the codes is stored.

What differs from a plain GPT (nanoGPT's model.py):
1. The input embedding of a hypertoken is computed on the fly by a small *hyper-encoder* from
   the embeddings of its base tokens.
2. The output layer scores the base vocabulary plus exactly the hypertokens the reader knows at
   each position (and the one it may learn this very step), with the same hyper-encoder vectors
   as unembeddings (tied weights): the model can emit hypertokens it never saw in training.
3. An auxiliary loss asks each hyper-embedding to remember its base tokens (reconstruction loss).
With max_subtokens=1 nothing is ever merged and the model is exactly a plain GPT.

Reference: Geng et al., "zip2zip: Inference-Time Adaptive Tokenization via Online Compression",
NeurIPS 2025, arXiv 2506.01084. The exact codec and output vocabulary are in DESIGN.md.

Beside this file: fastgen.py (the same generation, batched and compiled), kernels.py (the
lookups fused), evals/ (likelihoods, lm-eval), lib/checks.py (input checks).
"""

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from data.common import gpt2_bpe, token_byte_lengths
from lib.checks import as_ids, base_ids, check_codec, check_config, check_targets, prompt_rows


# -----------------------------------------------------------------------------
# LZW codec (DESIGN.md 1, with worked examples). One state machine serves the encoder and the
# decoder: the decoder feeds the base tokens of each code it reads into an encoder, whose
# codebook *is* the decoder's codebook (DESIGN.md 1.1: the "pending" id, KwKwK, is why).
class LZW:
    """Online LZW state over base ids 0..V-1; hypertoken V+i is the i-th entry ever created.
    vocab_size V: hypertoken ids start here.  max_codebook_size C: at most C entries.
    max_subtokens M: longest hypertoken in base tokens (a match reaching M is emitted at once).
    disabled_ids D: never merged (e.g. <|endoftext|>); each one is a wall between matches.
    The rule step by step, with a dict of tuples: tests/naive_lzw.py, which DESIGN.md 1 quotes;
    this class is the same codec made fast (a trie with integer keys, the match held as its id)."""

    def __init__(self, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
        check_codec(vocab_size, max_codebook_size, max_subtokens)
        self.V, self.C, self.M = vocab_size, max_codebook_size, max_subtokens
        self.disabled = frozenset(int(d) for d in disabled_ids)
        self.entries = []   # entries[i]: tuple of base ids of hypertoken V+i
        self.parents = []   # parents[i]: the id of the match that entry i extended by one base id
        # The codebook as a trie: edge key id*V + t -> the id of that match extended by base id t.
        # An int key is much faster to hash than a tuple, and the match is carried as its id.
        self.edges = {}
        self.buf = -1       # the current match (DESIGN.md's buf), as the id it is emitted as; -1: empty
        self.length = 0     # its length in base tokens

    def content(self, code):
        """The base ids a valid code stands for (base id or installed entry)."""
        return (code,) if code < self.V else self.entries[code - self.V]

    def feed(self, ids, out):
        """Advance the encoder over base ids, appending every code it emits to the list `out`."""
        V, C, M, D = self.V, self.C, self.M, self.disabled
        edges, entries, parents, emit = self.edges, self.entries, self.parents, out.append
        follow = edges.get                      # bound once: this loop is the codec's hot path
        buf, length, n = self.buf, self.length, len(self.entries)
        for t in ids:
            if buf >= 0:
                nxt = follow(buf * V + t)
                if nxt is not None:             # the match extends (never by a disabled id:
                    buf, length = nxt, length + 1    # no entry holds one)
                    if length == M:             # longest allowed: emit now, make no entry
                        emit(buf)
                        buf, length = -1, 0
                    continue
            if t in D:                          # a wall: flush the match, emit t, merge nothing
                if buf >= 0:
                    emit(buf)
                emit(t)
                buf, length = -1, 0
                continue
            if buf >= 0:                        # the match ends: new entry (if room), emit it
                if n < C:
                    edges[buf * V + t] = V + n
                    entries.append(((buf,) if buf < V else entries[buf - V]) + (t,))
                    parents.append(buf)
                    n += 1
                emit(buf)
            buf, length = t, 1                  # a single base id always matches
            if M == 1:
                emit(buf)
                buf, length = -1, 0
        self.buf, self.length = buf, length

    def flush(self, out):
        """End of input: emit the current match, if any."""
        if self.buf >= 0:
            out.append(self.buf)
        self.buf, self.length = -1, 0

    def pending(self):
        """Content of the pending id V + len(entries) (DESIGN.md 1.1: the match plus its own first
        token), or None when the next code cannot be it. (The match is always shorter than M
        here: a match of length M was emitted at once.)"""
        if self.buf < 0 or len(self.entries) >= self.C:
            return None
        match = self.content(self.buf)
        if self.buf * self.V + match[0] in self.edges:
            return None
        return match + (match[0],)

    def nodes(self, js):
        """Entries js as nodes of the codebook trie, [(parent, first base id, last base id)]: all
        the canonical mask needs to know of an entry (DESIGN.md 2.1)."""
        return [(self.parents[j], self.entries[j][0], self.entries[j][-1]) for j in js]

    def starting_with(self, ids):
        """Every code this state can read next whose content starts with the base ids `ids`: the
        base id itself (one id), the installed entries that begin with them, and the pending id if
        its content does. These are the codes that may stand where a text ending in `ids` goes on
        (DESIGN.md 2.2). Example: entries [1,2] [2,1] and pending [1,2,1]: (1,2) -> [V, V+2]."""
        ids, L = tuple(ids), len(ids)
        known = self.entries + [self.pending() or ()]        # the pending id is V + len(entries)
        return ([ids[0]] if L == 1 else []) + [self.V + j for j, e in enumerate(known) if e[:L] == ids]

    def resolve(self, code, position=None):
        """Base ids of the next code to read, or ValueError if this state cannot read it."""
        n = len(self.entries)
        if 0 <= code < self.V + n:
            return self.content(code)
        if code == self.V + n:
            pending = self.pending()
            if pending is not None:
                return pending
        where = "" if position is None else f" at position {position}"
        raise ValueError(f"invalid code {code}{where}: expected a base id < {self.V}, an installed "
                         f"hypertoken < {self.V + n}, or the pending id {self.V + n} when one exists")

    def push(self, code, position=None):
        """Decoder step: read one code (the entries it completes are installed); returns its base ids."""
        ids = self.resolve(code, position)
        self.feed(ids, [])
        return ids


def lzw_encode(ids, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Compress base ids to codes. Example (V=100): [1,2,1,2,1] -> [1, 2, 100, 1]."""
    ids = base_ids(ids, vocab_size)
    lzw, out = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), []
    lzw.feed(ids, out)
    lzw.flush(out)
    return out


def lzw_decode(codes, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Expand codes to base ids. Any valid stream decodes, canonical or not:
    [1, 2, 100, 1] -> [1,2,1,2,1], and so does [1, 2, 1, 2, 1]."""
    lzw, ids, fed = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), [], 0
    for i, code in enumerate(as_ids(codes, "codes")):
        if 0 <= code < vocab_size:
            ids.append(code)
            continue
        # Entries are only ever added, so the state needs to catch up on the ids decoded so far
        # only for a hypertoken it does not know yet (a newer entry, the pending id, or invalid).
        if code - vocab_size >= len(lzw.entries):
            lzw.feed(ids[fed:], [])
            fed = len(ids)
        ids.extend(lzw.resolve(code, i))
    return ids


# -----------------------------------------------------------------------------
# The tokenizer: text -> GPT-2 BPE base ids (tiktoken's r50k_base) -> LZW codes, and back
class Tokenizer:
    """GPT-2 BPE, then LZW. `<|endoftext|>` is a disabled id: nothing merges across documents.
    no_digit_merges=True also disables every base token that contains a digit, so numbers are
    always spelled in plain BPE tokens (the paper's math results degrade most under merging)."""

    def __init__(self, max_subtokens=4, max_codebook_size=1024, no_digit_merges=False):
        self.bpe = gpt2_bpe()                   # loaded from data/r50k_base.tiktoken (data/common.py)
        self.vocab_size, self.eot = self.bpe.n_vocab, self.bpe.eot_token
        self.max_subtokens, self.max_codebook_size = max_subtokens, max_codebook_size
        self.token_bytes = [self.bpe.decode_single_token_bytes(i) for i in range(self.vocab_size)]
        self.byte_lengths = token_byte_lengths(self.bpe)   # UTF-8 bytes per base id (<|endoftext|>: 0)
        digits = [i for i, b in enumerate(self.token_bytes) if any(48 <= c <= 57 for c in b)]
        self.disabled_ids = frozenset([self.eot] + (digits if no_digit_merges else []))

    def codec(self):
        """A fresh LZW state with this tokenizer's settings (for incremental decoding)."""
        return LZW(self.vocab_size, self.max_codebook_size, self.max_subtokens, self.disabled_ids)

    def encode_base(self, text):
        return self.bpe.encode(text, allowed_special={"<|endoftext|>"})

    def encode(self, text):
        lzw, codes = self.codec(), []
        lzw.feed(self.encode_base(text), codes)   # tiktoken's ids need none of lzw_encode's checks
        lzw.flush(codes)
        return codes

    def decode_base(self, ids):
        return self.bpe.decode(ids)

    def decode(self, codes):
        return self.decode_base(lzw_decode(codes, self.vocab_size, self.max_codebook_size,
                                           self.max_subtokens, self.disabled_ids))

    def n_bytes(self, ids):
        """UTF-8 bytes of the text that base ids stand for (the denominator of bits per byte)."""
        return int(self.byte_lengths[np.asarray(ids, dtype=np.int64)].sum())


# -----------------------------------------------------------------------------
# The hyper-batch: each row's codebook, position by position. Decode the row and record after each
# code t the entries installed (n_t), the encoder's current match and the pending content (if any).
# An entry's hyper-embedding depends only on its base ids, so contents are deduplicated across the
# batch and encoded once. Example (V=100, M=4), row [7, 100]:
#   after 7: n=0, match 7, pending (7,7) | after 100: n=1 (100=[7,7]), match 100, pending (7,7,7)
#   contents [(7,7), (7,7,7)]; entry_index[0] = [0]; nodes[0] = [(7, 7, 7)]; pending_index[0] = [0, 1]
NO_PARENT = -2   # the trie parent of a column that holds no installed entry (a pad, the pending id):
                 # never a match's id (-1: no match), so such a column is nobody's child (DESIGN.md 2.1)


@dataclass
class HyperBatch:
    contents: "torch.Tensor"       # (U, M) int64: unique base-id contents, padded with 0
    lengths: "torch.Tensor"        # (U,) int64: their lengths, 2..M
    entry_index: "torch.Tensor"    # (B, K) int64: row b's hypertoken V+j is contents[entry_index[b, j]]
    nodes: "torch.Tensor"          # (B, K, 3) int64: entry j as a trie node (LZW.nodes); pads NO_PARENT
    n_installed: "torch.Tensor"    # (B, T) int64: entries installed after reading codes 0..t
    match: "torch.Tensor"          # (B, T) int64: id of the encoder's current match after t; -1: none
    pending_index: "torch.Tensor"  # (B, T) int64: index in contents of the pending content after t; -1: none

    def to(self, device):
        return HyperBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def pad_contents(contents, M):
    """Contents (tuples of base ids) padded with 0 to M slots, as the hyper-encoder reads them (it
    masks the pads). Example, M=4: [(5, 7), (1, 2, 3)] -> [(5, 7, 0, 0), (1, 2, 3, 0)]."""
    return [c + (0,) * (M - len(c)) for c in contents]


def hyper_batch(rows, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Decode each row of codes (a list of lists, all of length T) into a HyperBatch."""
    index = {}                             # content -> its index in contents, in order of first use
    content_id = lambda c: index.setdefault(c, len(index))
    entry_index, nodes, n_installed, matches, pending_index = [], [], [], [], []
    for row in rows:
        lzw, n_row, match, pending = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), [], [], []
        for t, code in enumerate(row):     # decode; after each code, record what the reader knows
            lzw.feed(lzw.resolve(code, t) if code >= vocab_size else (code,), [])
            n_row.append(len(lzw.entries))
            match.append(lzw.buf)          # the current match's id; -1: none
            pending.append(lzw.pending())  # the pending content; None: no pending id
        entry_index.append([content_id(e) for e in lzw.entries])
        nodes.append(lzw.nodes(range(len(lzw.entries))))
        n_installed.append(n_row)
        matches.append(match)
        pending_index.append([-1 if p is None else content_id(p) for p in pending])
    contents, K, M, B = list(index), max((len(e) for e in entry_index), default=0), max_subtokens, len(rows)
    tensor = lambda a, *shape: torch.from_numpy(np.array(a, dtype=np.int64).reshape(shape))
    return HyperBatch(
        contents=tensor(pad_contents(contents, M), -1, M),
        lengths=tensor([len(c) for c in contents], -1),
        entry_index=tensor([e + [0] * (K - len(e)) for e in entry_index], B, K),
        nodes=tensor([p + [(NO_PARENT, 0, 0)] * (K - len(p)) for p in nodes], B, K, 3),
        n_installed=tensor(n_installed, B, -1),
        match=tensor(matches, B, -1),
        pending_index=tensor(pending_index, B, -1))


# -----------------------------------------------------------------------------
# nanoGPT's blocks (the hyper-encoder is made of them too)
class SelfAttention(nn.Module):
    """Multi-head self-attention: causal in the GPT, bidirectional over slots in the hyper-encoder."""

    def __init__(self, config, causal):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, causal

    def forward(self, x, mask=None, cache=None):
        # mask: (B, 1, T, Tk) bool, True where attention is allowed. cache, for decoding: (k, v, slots),
        # this layer's (B, nh, block_size, hs) caches and the (B, T) slots for this call's keys and values.
        B, T, d = x.size()                                              # d: n_embd
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k_cache, v_cache, slots = cache
            rows = torch.arange(B, device=x.device)[:, None]               # (B, 1)
            # written in place by indexed assignment (compiled, a scatter_ would copy the cache)
            k_cache[rows, :, slots], v_cache[rows, :, slots] = k.transpose(1, 2), v.transpose(1, 2)   # (B, T, nh, hs)
            k, v = k_cache, v_cache                # (B, nh, block_size, hs): attention reads it all, under the mask
        dropout = self.dropout if self.training else 0.0
        causal = self.causal and mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, d)                # (B, T, d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, causal=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The two embedding lookups in plain PyTorch, and the hyper-encoder. kernels.py fuses each lookup
# (tested equal to these); kernels.use_kernels(model) swaps them in, as train.py does on a GPU.
def embed_codes(idx, wte, table, vocab_size):
    """out[b, t] = wte[idx[b, t]] if idx[b, t] < vocab_size else table[b, idx[b, t] - vocab_size].
    idx (B, T) codes, wte (V, d), table (B, K, d) each row's hyper-embeddings -> (B, T, d).
    Boolean masks pick which positions read which table, so each position is looked up once.
    (Concatenating the tables into one F.embedding would copy all of wte every step.)
    Example, V=3: idx [[0, 3, 2]] -> [[wte[0], table[0, 0], wte[2]]]."""
    B, T = idx.shape
    table = table.to(wte.dtype)      # the hyper-encoder may run in another precision (autocast)
    base = idx < vocab_size                                          # (B, T)
    row = torch.arange(B, device=idx.device)[:, None].expand(B, T)  # (B, T) row of each position
    out = wte.new_empty(B, T, wte.size(1))                           # (B, T, d)
    out[base] = wte[idx[base]]
    out[~base] = table[row[~base], idx[~base] - vocab_size]
    return out


def embed_slots(contents, lengths, wte, slot_pos):
    """out[n, s] = wte[contents[n, s]] + slot_pos[s] for s < lengths[n], else exactly 0: the
    hyper-encoder's input. contents (N, M) base ids (pads hold any valid id), lengths (N,) in
    1..M, wte (V, d), slot_pos (M, d) -> (N, M, d).
    Example: contents [[5, 7, 0]], lengths [2] -> [[wte[5] + p[0], wte[7] + p[1], 0]]."""
    N, M = contents.shape
    pad = torch.arange(M, device=contents.device) >= lengths[:, None]   # (N, M)
    x = F.embedding(contents, wte) + slot_pos.to(wte.dtype)            # (N, M, d)
    return x.masked_fill(pad[..., None], 0.0)   # pads are exactly 0 and pass no gradient on


class HyperEncoder(nn.Module):
    """Embeds a hypertoken from the embeddings of its base tokens (config.hyper_encoder, DESIGN.md 3):
    "transformer", a small bidirectional transformer over the M slots (pads masked), narrow for it
    runs on about one new entry per decoding step; "mlp", an MLP over the M slot embeddings side by
    side (pads are exactly 0); "mean", the mean of the base embeddings (the paper's baseline). The
    first two add a zero-initialised projection to that mean: a new model starts at the mean."""

    def __init__(self, config):
        super().__init__()
        self.kind, M, d, dh = config.hyper_encoder, config.max_subtokens, config.n_embd, config.hyper_width
        self.register_buffer("slots", torch.arange(M), persistent=False)   # 0..M-1
        self.embed_slots = embed_slots      # the plain lookup (kernels.use_kernels: a fused one)
        if self.kind == "mean":
            return
        self.slot_pos = nn.Parameter(torch.randn(M, d) * 0.02)
        if self.kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(M * d, 4 * dh, bias=config.bias), nn.GELU())
            self.proj = nn.Linear(4 * dh, d, bias=config.bias)
            return
        inner = replace(config, n_embd=dh, n_head=config.hyper_n_head)
        self.c_in = nn.Linear(d, dh, bias=config.bias)
        self.blocks = nn.ModuleList([Block(inner, causal=False) for _ in range(config.hyper_n_layer)])
        self.ln_f = nn.LayerNorm(dh, bias=config.bias)
        self.proj = nn.Linear(dh, d, bias=config.bias)

    def forward(self, contents, lengths, wte):
        # contents (U, M) base ids, lengths (U,), wte (V, d) the base embeddings -> (U, d)
        U, M = contents.size()
        w = ((self.slots < lengths[:, None]) / lengths[:, None]).to(wte.dtype)    # (U, M): mean weights, pads 0
        if self.kind == "mean":
            return torch.einsum("um,umd->ud", w, F.embedding(contents, wte))
        x = self.embed_slots(contents, lengths, wte, self.slot_pos)        # (U, M, d), pads are 0
        mean = torch.einsum("um,umd->ud", w, x - self.slot_pos.to(x.dtype))  # (U, d): of the base embeddings
        if self.kind == "mlp":
            # (U, M * d), spelled out: view(U, -1) cannot size a batch with no contents (U = 0)
            return mean + self.proj(self.mlp(x.view(U, M * x.size(-1))))
        # attention over a content's own slots: log w is -inf on pads and one constant on its real
        # slots, which softmax ignores (one op, where a boolean mask costs three)
        keys = w.log()[:, None, None, :]                                    # (U, 1, 1, M)
        h = self.c_in(x)                                                    # (U, M, dh)
        for block in self.blocks:
            h = block(h, keys)
        return mean + self.proj(torch.einsum("um,umd->ud", w, self.ln_f(h)))


# -----------------------------------------------------------------------------
# The output vocabulary at each position: exact (DESIGN.md 2) and canonical (2.1)
def canon_facts(match, n, nodes, pending_first):
    """What the canonical mask (DESIGN.md 2.1) needs at positions (...), from what the reader knows
    there: the one rule for what each hyper column is. match (...): the encoder's current match (-1:
    none); n (...): the entries installed; nodes (..., K, 3): the row's entries as trie nodes (LZW.nodes;
    rows j >= n are not read); pending_first (...): the pending content's first base id (any if none).
    Returns (match, parent, first, last), the last three (..., K + 1): column j < n is entry j, child
    of match `parent`; column n (the pending id) and every column past it are nobody's (NO_PARENT)."""
    col = torch.arange(nodes.size(-2) + 1, device=nodes.device)                 # (K + 1,)
    parent, first, last = F.pad(nodes, (0, 0, 0, 1)).unbind(-1)                 # (..., K + 1) each
    n = n[..., None]
    first = torch.where(col == n, pending_first[..., None], first)
    return match, torch.where(col < n, parent, NO_PARENT), first, last.expand_as(first)


def vocabulary_logits_(base, hyper_logits, n_valid, canon=None):
    """The next-code logits over the exact vocabulary (DESIGN.md 2) and, with canon, only the
    canonical codes (DESIGN.md 2.1): the one rule of training, scoring and decoding.
    base (..., V): the base logits, masked in place (hence the underscore); hyper_logits (..., K + 1):
    the hypertoken logits, column j < n entry j and column n the pending id (n: the entries
    installed); n_valid (...): the valid hyper columns, n + 1 if a pending id exists, else n;
    canon: canon_facts's (match, parent, first, last). Returns (..., V + K + 1): column V + j is
    hypertoken V + j, every invalid or non-canonical code -inf."""
    invalid = torch.arange(hyper_logits.size(-1), device=base.device) >= n_valid[..., None]   # (..., K + 1)
    if canon is not None:
        # No code may start with a child of the match (DESIGN.md 2.1): -inf at the children's last
        # base ids, then at each hypertoken that starts with one. The ban is built in the logits'
        # dtype, not as log(0/1): CUDA autocast runs log in fp32, and scatter_add_ wants the logits'.
        match, parent, first, last = canon
        ban = base.new_zeros(()).masked_fill(parent == match[..., None], float("-inf"))   # (..., K + 1)
        base.scatter_add_(-1, last, ban)                                      # -inf at the children's last ids
        invalid = invalid | (base.gather(-1, first) == float("-inf"))
    return torch.cat([base, hyper_logits.masked_fill(invalid, float("-inf"))], dim=-1)


def token_nll(logits, targets):
    """Negative log-likelihood of each target (same shape as targets, fp32), 0 where it is -1.
    Computed in the logits' own dtype with fp32 accumulation (autocast off): a bf16 model never
    holds an fp32 copy of its (B, T, V + K + 1) logits."""
    with torch.autocast(logits.device.type, enabled=False):
        nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")
    return nll.float().view(targets.shape)


def sample(logits, temperature, top_k, draw=None):
    """The next code of each row (B,) from its logits (B, W): greedy when temperature is 0 or top_k
    is 1, else a draw from softmax(logits / temperature) over the top_k codes, by torch.multinomial
    or by draw(probs) (fastgen.race: the same distribution with no host sync)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    # Subtle: the best logit is shifted to 0 first, so a tiny temperature sends the others to -inf (never
    # inf - inf = NaN) and the draw to greedy; the divisor stays >= 1e-30, which fp32 does not round to 0.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, 1e-30)
    if top_k is not None:                   # -inf below the k-th largest logit
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1)[:, 0] if draw is None else draw(probs)


# -----------------------------------------------------------------------------
# Reading one code at a time with a KV cache (the Stepper): GPT.generate's loop, and
# likelihood.nll's past the context. fastgen.py runs the same for a batch, as one static step.
def context_length(n, block_size):
    """How many of a row's last codes are in the context once its first n codes are read one at
    a time: the rule for a full context, written once (the Stepper and fastgen.py follow it). A
    code that finds the context full keeps the block_size // 2 - 1 codes before it (their keys and
    values computed again, at positions from 0) and goes on, so past block_size the count cycles
    from block_size // 2 up to block_size. Example, block_size 16: n = 16 -> 16, 17 -> 8, 25 -> 16."""
    if n <= block_size:
        return n
    keep = block_size // 2
    return keep + (n - block_size - 1) % (block_size - keep + 1)


def cache_dtype(model):
    """The KV cache's dtype, the blocks' compute dtype: autocast's if it is on, else the weights'."""
    kind, weights = model.device.type, model.transformer.wte.weight
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weights.dtype


def embed_contents(model, contents):
    """Input and output hyper-embeddings (N, d) of a list of contents (tuples of base ids)."""
    M, device = model.config.max_subtokens, model.device
    padded = torch.tensor(pad_contents(contents, M), device=device)                         # (N, M)
    return model.hyper_tables(padded, torch.tensor([len(e) for e in contents], device=device))


class Stepper:
    """KV-cached reading of one row of codes, one code at a time: read(code) returns the logits of
    the code after it, (V + n + 1,) with n installed hypertokens (V + n: the pending id). It keeps
    the row's LZW decoder (DESIGN.md 1.1), the hyper-embeddings of its entries (each encoded once,
    when installed) and every layer's keys and values. A full context is cropped as context_length
    says and goes on: the codebook lives on."""

    def __init__(self, model):
        c, w = model.config, model.transformer.wte.weight
        self.model, self.lzw, self.n_read, self.context = model, model.codec(), 0, []   # context: codes in the cache
        self.table_in = self.table_out = w.new_zeros(0, c.n_embd)       # (n, d): entry j's hyper-embeddings
        self.nodes = torch.zeros(0, 3, dtype=torch.long, device=w.device)   # (n, 3): entry j as a trie node
        shape, dtype = (c.n_layer, 1, c.n_head, c.block_size, c.n_embd // c.n_head), cache_dtype(model)
        self.k, self.v = w.new_zeros(shape, dtype=dtype), w.new_zeros(shape, dtype=dtype)   # (layer, 1, nh, block, hs)

    @torch.no_grad()
    def read(self, code):
        c, n = self.model.config, len(self.lzw.entries)
        self.lzw.push(code, self.n_read)          # decode it (ValueError if it is no valid code here)
        if len(self.lzw.entries) > n:                # the entries it installed: encode them once
            h_in, h_out = embed_contents(self.model, self.lzw.entries[n:])
            self.table_in, self.table_out = torch.cat([self.table_in, h_in]), torch.cat([self.table_out, h_out])
            new = torch.tensor(self.lzw.nodes(range(n, len(self.lzw.entries))), device=self.nodes.device)
            self.nodes = torch.cat([self.nodes, new])
        self.n_read += 1
        keep = context_length(self.n_read, c.block_size) - 1   # the codes before this one that stay
        if keep < len(self.context):              # full: crop, and compute the kept codes again
            kept, self.context = self.context[len(self.context) - keep:], []
            for old in kept:
                self.attend(old)
        return self.next_logits(self.attend(code))

    def attend(self, code):
        """Run a code through the blocks at the next position (keys and values into the cache): its final state (d,)."""
        m, c, pos = self.model, self.model.config, len(self.context)
        self.context.append(code)
        x = m.transformer.wte.weight[code] if code < c.vocab_size else self.table_in[code - c.vocab_size]
        x = (x + m.transformer.wpe.weight[pos])[None, None]                         # (1, 1, d)
        mask = (torch.arange(c.block_size, device=x.device) <= pos)[None, None, None]  # (1, 1, 1, block): filled slots
        slot = torch.tensor([[pos]], device=x.device)                               # (1, 1)
        for i, block in enumerate(m.transformer.h):
            x = block.forward(x, mask, (self.k[i], self.v[i], slot))   # .forward: not a compiled graph
        return m.transformer.ln_f(x)[0, 0]

    def next_logits(self, x):
        """The logits of the next code from the hidden state x (d,): the exact vocabulary (DESIGN.md 2)."""
        m, c, lzw = self.model, self.model.config, self.lzw
        base = m.lm_head(x)                                                         # (V,)
        if not c.has_hypertokens:
            return base
        pending, n = lzw.pending(), len(lzw.entries)
        # the pending id scores with its content's vector: hyper column n (zeros when there is none)
        pending_vec = embed_contents(m, [pending])[1] if pending else x.new_zeros(1, c.n_embd)
        hyper_logits = torch.cat([self.table_out, pending_vec.to(self.table_out.dtype)]) @ x   # (n + 1,)
        t = lambda v: torch.tensor(v, device=x.device)
        canon = canon_facts(t(lzw.buf), t(n), self.nodes, t((pending or (0,))[0])) if c.canonical else None
        return vocabulary_logits_(base, hyper_logits, t(n + (pending is not None)), canon)


# -----------------------------------------------------------------------------
# The config and the model: nanoGPT's GPT, plus a hyper-encoder for the hypertoken rows
@dataclass
class GPTConfig:
    block_size: int = 1024          # context, in codes: on source code it holds about twice the text of BPE
    vocab_size: int = 50257         # V: GPT-2's BPE base vocabulary; hypertoken ids start here
    n_layer: int = 12               # GPT-2 small (124M), so released weights load for adaptation
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0            # pretraining on this much data does not overfit
    bias: bool = True               # GPT-2 has biases; False is a little faster and as good
    max_subtokens: int = 4          # M: longest hypertoken; 1 = plain GPT; the paper finds 3..5 close
    max_codebook_size: int = 1024   # C: at most this many hypertokens per sequence
    disabled_ids: tuple = (50256,)  # never merged: <|endoftext|> (the tokenizer may add digits)
    canonical: bool = True          # score only canonical codes (DESIGN.md 2.1): the NLL is -log P(text)
    hyper_encoder: str = "transformer"  # transformer | mlp | mean (HyperEncoder says what each is)
    hyper_n_layer: int = 1          # hyper-encoder depth: 1-2 layers beat mean pooling in the paper
    hyper_n_embd: int = 0           # its width; 0: about n_embd // 4 (hyper_width): a step's new entry is cheap
    hyper_n_head: int = 4           # its heads: few, for it attends over at most M slots
    tie_weights: bool = True        # one embedding (and one hyper-encoder) for input and output, as GPT-2
    recon_lambda: float = 0.1       # weight of the reconstruction loss (paper: 0.1); 0 turns it off
    recon_max_entries: int = 256    # hypertokens per batch it is computed on: it needs (N*M, V) logits

    def __post_init__(self):
        check_config(self)

    @property
    def hyper_width(self):
        """The hyper-encoder's width: hyper_n_embd, or with 0 about n_embd // 4, a multiple of its heads."""
        return self.hyper_n_embd or max(self.n_embd // 4 // self.hyper_n_head, 1) * self.hyper_n_head

    @property
    def has_hypertokens(self):
        return self.max_subtokens > 1     # M=1: nothing ever merges, a plain GPT


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.embed_codes = embed_codes      # the plain lookup (kernels.use_kernels: a fused one)
        if config.has_hypertokens:   # M=1: no hypertokens, no extra parameters: exactly nanoGPT's GPT
            self.hyper_in = HyperEncoder(config)
            self.hyper_out = self.hyper_in if config.tie_weights else HyperEncoder(config)
            # f_psi of the reconstruction loss: one linear map per slot, then the base unembedding
            self.recon = nn.Parameter(torch.zeros(config.max_subtokens, config.n_embd, config.n_embd))
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):   # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.has_hypertokens:
            for enc in {self.hyper_in, self.hyper_out}:
                if hasattr(enc, "proj"):
                    nn.init.zeros_(enc.proj.weight)
            nn.init.normal_(self.recon, std=1 / math.sqrt(config.n_embd))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self):
        return self.transformer.wte.weight.device

    def codec(self):
        """A fresh LZW state with this model's settings."""
        c = self.config
        return LZW(c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)

    def hyper_batch(self, rows):
        c = self.config
        return hyper_batch(rows, c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)

    def hyper_tables(self, contents, lengths):
        """Input and output hyper-embeddings of contents (U, M): two (U, d) tensors."""
        h_in = self.hyper_in(contents, lengths, self.transformer.wte.weight)
        if self.config.tie_weights:
            return h_in, h_in
        return h_in, self.hyper_out(contents, lengths, self.lm_head.weight)

    def forward(self, idx, targets=None, hyper=None, with_parts=False):
        """idx (B, T) codes -> logits (B, T, V [+ K + 1]) and, with targets, the loss (else None).
        Column V + j is hypertoken V + j. hyper: the rows' HyperBatch; derived from idx if None,
        and then the targets are checked too (a loader's batches are valid by construction).
        with_parts=True also returns the loss's parts, detached, as a third value: {"lm": the
        mean NLL of the targets, "recon": the reconstruction loss, when there is one}."""
        c, device = self.config, idx.device
        B, T = idx.size()
        if T > c.block_size:
            raise ValueError(f"cannot forward {T} codes: block_size is {c.block_size}")
        wte = self.transformer.wte.weight
        derived = c.has_hypertokens and hyper is None
        if derived:
            hyper = self.hyper_batch(idx.tolist()).to(device)
        if c.has_hypertokens:
            h_in, h_out = self.hyper_tables(hyper.contents, hyper.lengths)    # (U, d) each
            table_in = h_in[hyper.entry_index]                                # (B, K, d)
        else:
            table_in = wte.new_zeros(B, 0, c.n_embd)
        tok_emb = self.embed_codes(idx, wte, table_in, c.vocab_size)         # (B, T, d)
        pos_emb = self.transformer.wpe(torch.arange(T, device=device))        # (T, d)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)                                              # (B, T, V)
        if c.has_hypertokens:
            logits = self.exact_logits_(logits, x, hyper, h_out)             # (B, T, V + K + 1)
        if targets is None:
            return (logits, None, {}) if with_parts else (logits, None)
        if derived:   # checked where it costs no extra device sync
            check_targets(logits, targets, hyper, c.vocab_size)
        lm_loss = token_nll(logits, targets).sum() / (targets >= 0).sum()
        loss, parts = lm_loss, {"lm": lm_loss.detach()}
        if c.has_hypertokens and c.recon_lambda > 0 and c.recon_max_entries > 0:
            # also on a batch with no contents, where it is 0: f_psi still gets a (zero) gradient,
            # which DDP waits for on every rank
            recon = self.reconstruction_loss(h_in, hyper.contents, hyper.lengths)
            loss = loss + c.recon_lambda * recon
            if hyper.contents.size(0) > 0:
                parts["recon"] = recon.detach()
        return (logits, loss, parts) if with_parts else (logits, loss)

    def exact_logits_(self, base, x, hyper, h_out):
        """The logits over each position's exact (and canonical) vocabulary (DESIGN.md 2, 2.1): base
        (B, T, V), masked in place, joined with the scores of the row's installed entries and its pending
        id. x (B, T, d): the final hidden states; h_out (U, d): the contents' output hyper-embeddings."""
        K = hyper.entry_index.size(1)
        table = h_out[hyper.entry_index]                                      # (B, K, d)
        # the pending id's vector; -1 (no pending id) reads an appended row of zeros
        pending_vec = torch.cat([h_out, h_out.new_zeros(1, x.size(-1))])[hyper.pending_index]   # (B, T, d)
        pending_logit = torch.einsum("btd,btd->bt", x, pending_vec)[..., None]                 # (B, T, 1)
        hyper_logits = torch.cat([x @ table.transpose(1, 2), pending_logit], dim=-1)          # (B, T, K + 1)
        col, n = torch.arange(K + 1, device=x.device), hyper.n_installed[..., None]            # (K + 1,), (B, T, 1)
        hyper_logits = torch.where(col == n, pending_logit, hyper_logits)     # the pending id is V + n
        canon = None
        if self.config.canonical:   # the pending content's first base id (0: none) at each position
            pending_first = torch.cat([hyper.contents[:, 0], hyper.contents.new_zeros(1)])[hyper.pending_index]
            canon = canon_facts(hyper.match, hyper.n_installed, hyper.nodes[:, None], pending_first)
        return vocabulary_logits_(base, hyper_logits, hyper.n_installed + (hyper.pending_index >= 0), canon)

    def reconstruction_loss(self, h, contents, lengths):
        """The paper's auxiliary loss: each slot's base id from the hyper-embedding, by f_psi (0 if U = 0)."""
        U, M = contents.size()
        n = min(U, self.config.recon_max_entries)
        pick = torch.randperm(U, device=h.device)[:n]                         # a random subsample
        z = torch.einsum("nd,sde->nse", h[pick], self.recon)                  # (n, M, d)
        logits = self.lm_head(self.transformer.ln_f(z))                       # (n, M, V)
        target = contents[pick].masked_fill(torch.arange(M, device=h.device) >= lengths[pick, None], -1)
        return token_nll(logits, target).sum() / (target >= 0).sum().clamp(min=1)

    def last_code_choices(self, codes):
        """The codes that may stand at the last position of `codes` when their text goes on: every
        valid code there whose content starts with the last code's (DESIGN.md 2.2). The prefix NLL
        that training's evaluation reports, -log P(the model's text starts with this one), sums
        their probabilities at the last position, and evals/likelihood.py builds on the same rule."""
        lzw = self.codec()
        for t, code in enumerate(codes[:-1]):
            lzw.push(code, t)
        return lzw.starting_with(lzw.resolve(codes[-1], len(codes) - 1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue each row of codes by max_new_tokens codes, one row and one code at a time
        (fastgen.generate: the same, batched and compiled). idx: a (B, T) tensor, or a list of B
        lists of codes (prompts of different lengths). Returns the same kind, prompts included.
        Everything it returns decodes; temperature 0 or top_k=1 is greedy."""
        rows, out = prompt_rows(idx, temperature, top_k, max_new_tokens), []
        for b, row in enumerate(rows):       # rows never affect each other: one at a time
            row, stepper = list(row), Stepper(self)
            for code in row:                 # read the prompt: its codebook grows as it is read
                logits = stepper.read(code)
            for _ in range(max_new_tokens):
                if torch.isneginf(logits).all():   # only with a canonical model and no disabled id (DESIGN.md 2.1)
                    raise ValueError(f"row {b} has no valid next code: every code is masked")
                code = sample(logits[None], temperature, top_k).item()      # draw the next code
                row.append(code)
                logits = stepper.read(code)  # read it: new entries, then the next code's logits
            out.append(row)
        return torch.tensor(out, dtype=idx.dtype, device=idx.device) if torch.is_tensor(idx) else out
