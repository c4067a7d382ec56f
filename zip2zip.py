"""
zip2zip: a GPT that grows its vocabulary while it reads and writes.

Text is first cut into GPT-2 BPE tokens ("base tokens", ids 0..V-1). Those are then compressed
online with LZW: each time a run of base tokens is seen that extends a known run, the extended
run becomes a *hypertoken* with the next free id V, V+1, ... The codebook starts empty for every
text and is rebuilt by the reader from the codes alone, so nothing but the codes is stored.

What differs from a plain GPT (nanoGPT's model.py):
1. The input embedding of a hypertoken is computed on the fly by a small *hyper-encoder* from
   the embeddings of its base tokens.
2. The output layer scores the base vocabulary plus, per sequence and per position, exactly the
   hypertokens the reader knows at that point (and the one it may learn this very step). The
   same hyper-encoder vectors serve as unembeddings (tied weights), so the model can emit
   hypertokens it has never seen in training.
3. An auxiliary loss asks each hyper-embedding to remember its base tokens (the paper's
   reconstruction loss).
With max_subtokens=1 nothing is ever merged and the model is exactly a plain GPT.

Reference: Geng et al., "zip2zip: Inference-Time Adaptive Tokenization via Online Compression",
NeurIPS 2025, arXiv 2506.01084. The exact codec and output vocabulary are in DESIGN.md.

Layout: the LZW codec, the tokenizer, the hyper-encoder, attention, MLP, Block, the config, and
the model: forward and its losses, likelihoods, and generation one code at a time (Stepper).
Beside it: fastgen.py (the same generation, batched and compiled), kernels.py (fused lookups),
multiview.py (likelihoods summed over segmentations); the scripts' plumbing is in lib/.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np

from data.common import gpt2_bpe

# -----------------------------------------------------------------------------
# LZW codec
#
# One state machine serves the encoder and the decoder: the decoder pushes the base tokens of
# each code it reads into an encoder, and the encoder's codebook *is* the decoder's codebook.
#
# Example (V=100, C=64, M=4): [7,7,7,7,7,7,7,7] -> [7, 100, 101, 100]
#   7 -> new entry 100:[7,7], emit 7      | 7,7 -> match 100
#   7 -> new entry 101:[7,7,7], emit 100  | 7,7 -> match 100, then 7,7,7 -> match 101
#   7 -> new entry 102:[7,7,7,7], emit 101| 7,7 -> end of input, emit 100
# The decoder reads 101 before it has seen 7,7,7 as an entry: it was made one token earlier, by
# the encoder, from the match plus its own first token (the classic "KwKwK" case, the "pending"
# id below).


class LZW:
    """Online LZW state over base ids 0..V-1; hypertoken V+i is the i-th entry ever created.

    vocab_size V: hypertoken ids start here.  max_codebook_size C: at most C entries.
    max_subtokens M: longest hypertoken in base tokens (a match reaching M is emitted at once).
    disabled_ids D: never merged (e.g. <|endoftext|>); each one is a wall between matches.
    """

    def __init__(self, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
        if vocab_size < 1 or max_codebook_size < 0 or max_subtokens < 1:
            raise ValueError(f"need vocab_size >= 1, max_codebook_size >= 0, max_subtokens >= 1; "
                             f"got {vocab_size}, {max_codebook_size}, {max_subtokens}")
        self.V, self.C, self.M = vocab_size, max_codebook_size, max_subtokens
        self.disabled = frozenset(int(d) for d in disabled_ids)
        self.entries = []   # entries[i]: tuple of base ids of hypertoken V+i
        self.parents = []   # parents[i]: code of the match that entry i extended by one base id
        # The codebook as a trie: edge key code*V + t -> code of that match extended by base id t.
        # An int key is much faster to hash than a tuple, and the match is carried as its code.
        self.edges = {}
        self.code = -1      # code of the current match ("buf" in DESIGN.md); -1 when empty
        self.length = 0     # its length in base tokens

    def content(self, code):
        """The base ids a valid code stands for (base id or installed entry)."""
        return (code,) if code < self.V else self.entries[code - self.V]

    def feed(self, ids, out):
        """Advance the encoder over base ids, appending every code it emits to the list `out`."""
        V, C, M, D = self.V, self.C, self.M, self.disabled
        edges, entries, parents, emit = self.edges, self.entries, self.parents, out.append
        follow = edges.get                      # bound once: this loop is the codec's hot path
        code, length, n = self.code, self.length, len(self.entries)
        for t in ids:
            if code >= 0:
                nxt = follow(code * V + t)
                if nxt is not None:             # the match extends (never by a disabled id:
                    code, length = nxt, length + 1   # no entry holds one)
                    if length == M:             # longest allowed: emit now, make no entry
                        emit(code)
                        code, length = -1, 0
                    continue
            if t in D:                          # a wall: flush the match, emit t, merge nothing
                if code >= 0:
                    emit(code)
                emit(t)
                code, length = -1, 0
                continue
            if code >= 0:                       # the match ends: new entry (if room), emit it
                if n < C:
                    edges[code * V + t] = V + n
                    entries.append(((code,) if code < V else entries[code - V]) + (t,))
                    parents.append(code)
                    n += 1
                emit(code)
            code, length = t, 1                 # a single base id always matches
            if M == 1:
                emit(code)
                code, length = -1, 0
        self.code, self.length = code, length

    def flush(self, out):
        """End of input: emit the current match, if any."""
        if self.code >= 0:
            out.append(self.code)
        self.code, self.length = -1, 0

    @property
    def n_entries(self):
        return len(self.entries)

    def copy(self):
        """An independent copy of this state (entries are tuples: shared safely)."""
        new = LZW.__new__(LZW)
        new.__dict__.update(self.__dict__, entries=list(self.entries), parents=list(self.parents),
                            edges=dict(self.edges))
        return new

    def pending(self):
        """Content of the pending id V + n_entries, or None when the next code cannot be it.

        The encoder may use an entry the moment it creates it: that entry is the current match
        plus its own first token (KwKwK). It is only possible when there is a match, the
        codebook has room, and that extension is not an entry already. (The match is always
        shorter than M here: a match of length M was emitted at once.)
        """
        if self.code < 0 or len(self.entries) >= self.C:
            return None
        buf = self.content(self.code)
        if self.code * self.V + buf[0] in self.edges:
            return None
        return buf + (buf[0],)

    def starting_with(self, ids):
        """Every code this state can read next whose content starts with the base ids `ids`: the
        base id itself (one id), the installed entries that begin with them, and the pending id if
        its content does. These are the codes that may stand where a text ending in `ids` goes on
        (DESIGN.md 2.2). Example: entries [1,2] [2,1] and pending [1,2,1]: (1,2) -> [V, V+2]."""
        ids, L = tuple(ids), len(ids)
        codes = [ids[0]] if L == 1 else []
        codes += [self.V + j for j, e in enumerate(self.entries) if e[:L] == ids]
        pending = self.pending()
        if pending is not None and pending[:L] == ids:
            codes.append(self.V + len(self.entries))
        return codes

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

    def trace(self, codes):
        """Decode codes; after each, record the number of installed entries, the code of the
        current match (-1: none) and the pending content (pending(); None when there is no pending
        id). What the model needs at every position of a row (hyper_batch)."""
        n_after, match_after, pending_after, sink = [], [], [], []
        for t, code in enumerate(codes):
            self.feed(self.resolve(code, t) if code >= self.V else (code,), sink)
            n_after.append(len(self.entries))
            match_after.append(self.code)
            pending_after.append(self.pending())
        return n_after, match_after, pending_after

    def push(self, code, position=None):
        """Decoder step: read one code. Returns (its base ids, the ids of the entries it installed)."""
        ids = self.resolve(code, position)
        n = len(self.entries)
        self.feed(ids, [])
        return ids, range(self.V + n, self.V + len(self.entries))


def check_base_ids(ids, vocab_size, offset=0):
    # two fast passes (min, max); the walk that finds the position runs only on a failure
    if len(ids) and not (0 <= min(ids) and max(ids) < vocab_size):
        i = next(i for i, t in enumerate(ids) if not 0 <= t < vocab_size)
        raise ValueError(f"base id {ids[i]} at position {offset + i} is outside the base vocabulary "
                         f"0..{vocab_size - 1}")


def as_ids(ids, what="ids"):
    """ids as a list of Python ints. Ids are integers: floats, bools, None or a 2-D array are a
    TypeError that says so (a float id would otherwise pass through the decoder unnoticed)."""
    if getattr(ids, "ndim", 1) != 1:
        raise TypeError(f"{what} must be one-dimensional, got an array of {ids.ndim} dimensions")
    if not isinstance(ids, list):
        if not hasattr(ids, "__iter__"):
            raise TypeError(f"{what} must be a sequence of integers, got {type(ids).__name__}")
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    types = set(map(type, ids))
    if types - {int}:                                  # rare: numpy ints, or something wrong
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"{what} must be integers, got {t!r} ({type(t).__name__}) at position {i}")
        ids = [int(t) for t in ids]
    return ids


def base_ids(ids, vocab_size, offset=0):
    """ids as a list of Python ints in 0..vocab_size-1, or the TypeError or ValueError that says
    what is wrong. An integer array (a window of a .bin memmap, in the training loader) needs no
    walk over its values: its dtype says they are integers, and numpy checks their range."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
        if ids.size and not (0 <= ids.min() and ids.max() < vocab_size):
            check_base_ids(ids, vocab_size, offset)    # finds the position and raises
        return ids.tolist()
    ids = as_ids(ids)
    check_base_ids(ids, vocab_size, offset)
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
        if code - vocab_size >= lzw.n_entries:
            lzw.feed(ids[fed:], [])
            fed = len(ids)
        ids.extend(lzw.resolve(code, i))
    return ids


# -----------------------------------------------------------------------------
# Tokenizer: text -> GPT-2 BPE base ids (tiktoken r50k_base) -> LZW codes, and back

class Tokenizer:
    """GPT-2 BPE, then LZW. `<|endoftext|>` is a disabled id: nothing merges across documents.

    no_digit_merges=True also disables every base token that contains a digit, so numbers are
    always spelled in plain BPE tokens (the paper's math results degrade most under merging).
    """

    def __init__(self, max_subtokens=4, max_codebook_size=1024, no_digit_merges=False):
        self.bpe = gpt2_bpe()
        self.vocab_size = self.bpe.n_vocab
        self.eot = self.bpe.eot_token
        self.max_subtokens, self.max_codebook_size = max_subtokens, max_codebook_size
        self.token_bytes = [self.bpe.decode_single_token_bytes(i) for i in range(self.vocab_size)]
        # UTF-8 bytes of text per base id; <|endoftext|> is a separator, not text: 0 bytes
        self.byte_lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        self.byte_lengths[self.eot] = 0
        disabled = {self.eot}
        if no_digit_merges:
            disabled |= {i for i, b in enumerate(self.token_bytes) if any(48 <= c <= 57 for c in b)}
        self.disabled_ids = frozenset(disabled)

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
# The model needs torch; the codec and the tokenizer above do not.

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

# -----------------------------------------------------------------------------
# What the model needs to know about each row's codebook, position by position
#
# The codebook of a row is a function of the row's codes: decode them and record, after each
# position t, how many entries are installed (n_t), the encoder's current match and the pending
# content (if any). The hyper-encoder output depends only on an entry's base ids, so contents
# are deduplicated across the whole batch and encoded once. Example (V=100, M=4), row [7, 100]:
#   after 7: n=0, match 7, pending (7,7) | after 100: n=1 (100=[7,7]), match 100, pending (7,7,7)
#   contents [(7,7), (7,7,7)]; entries[0] = [0]; parents[0] = [7]; pending_index[0] = [0, 1]


@dataclass
class HyperBatch:
    contents: "torch.Tensor"       # (U, M) int64: unique base-id contents, padded with 0
    lengths: "torch.Tensor"        # (U,) int64: their lengths, 2..M
    entries: "torch.Tensor"        # (B, K) int64: row b's hypertoken V+j is contents[entries[b, j]]
    parents: "torch.Tensor"        # (B, K) int64: the code entry j extended by one base id; -2: pad
    n_installed: "torch.Tensor"    # (B, T) int64: entries installed after reading codes 0..t
    match: "torch.Tensor"          # (B, T) int64: code of the encoder's current match after t; -1: none
    pending_index: "torch.Tensor"  # (B, T) int64: index in contents of the pending content after t; -1: none

    def to(self, device):
        """On `device`; through pinned memory to a GPU, so that the copies are asynchronous."""
        cuda = torch.device(device).type == "cuda"
        return HyperBatch(*((getattr(self, f.name).pin_memory() if cuda else getattr(self, f.name))
                            .to(device, non_blocking=cuda) for f in fields(self)))


def hyper_batch(rows, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Decode each row of codes (a list of lists, all of length T) into a HyperBatch."""
    index, contents = {}, []               # content -> its index in `contents`

    def content_id(c):
        if c not in index:
            index[c] = len(contents)
            contents.append(c)
        return index[c]

    entries, parents, n_installed, matches, pending_index = [], [], [], [], []
    for row in rows:
        lzw = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids)
        n_row, match, pending = lzw.trace(row)
        entries.append([content_id(e) for e in lzw.entries])
        parents.append(lzw.parents)
        n_installed.append(n_row)
        matches.append(match)
        pending_index.append([-1 if p is None else content_id(p) for p in pending])
    K, M, B = max((len(e) for e in entries), default=0), max_subtokens, len(rows)
    tensor = lambda a, *shape: torch.from_numpy(np.array(a, dtype=np.int64).reshape(shape))
    return HyperBatch(
        contents=tensor([c + (0,) * (M - len(c)) for c in contents], -1, M),
        lengths=tensor([len(c) for c in contents], -1),
        entries=tensor([e + [0] * (K - len(e)) for e in entries], B, K),
        parents=tensor([p + [-2] * (K - len(p)) for p in parents], B, K),
        n_installed=tensor(n_installed, B, -1),
        match=tensor(matches, B, -1),
        pending_index=tensor(pending_index, B, -1))


# -----------------------------------------------------------------------------
# The model: nanoGPT's GPT, plus a hyper-encoder for the hypertoken rows


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal in the GPT, bidirectional over slots in the hyper-encoder."""

    def __init__(self, config, causal):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, causal

    def forward(self, x, mask=None, cache=None):
        # mask: (B, 1, T, Tk) bool, True where attention is allowed. cache: (k, v, slots) for
        # decoding: this layer's (B, nh, block_size, hs) caches and the (B, T) slots where this
        # call's keys and values go; attention then reads the whole cache, under the mask.
        B, T, d = x.size()                                              # d: n_embd
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k_cache, v_cache, slots = cache
            at = slots[:, None, :, None].expand(B, self.n_head, T, d // self.n_head)
            k, v = k_cache.scatter_(2, at, k), v_cache.scatter_(2, at, v)   # (B, nh, block_size, hs)
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
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


# The two embedding lookups, in plain PyTorch. kernels.py fuses each into one Triton kernel,
# tested equal to these, and kernels.use_kernels(model) swaps them in (train.py does on a GPU).


def embed_codes(idx, wte, table, vocab_size):
    """out[b, t] = wte[idx[b, t]] if idx[b, t] < vocab_size else table[b, idx[b, t] - vocab_size].

    idx (B, T) codes, wte (V, d), table (B, K, d) each row's hyper-embeddings -> (B, T, d).
    Boolean masks pick which positions read which table, so each position is looked up once.
    (Concatenating the tables into one F.embedding would copy all of wte every step.)
    Example, V=3: idx [[0, 3, 2]] -> [[wte[0], table[0, 0], wte[2]]].
    """
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
    Example: contents [[5, 7, 0]], lengths [2] -> [[wte[5] + p[0], wte[7] + p[1], 0]].
    """
    N, M = contents.shape
    pad = torch.arange(M, device=contents.device) >= lengths[:, None]   # (N, M)
    x = F.embedding(contents, wte) + slot_pos.to(wte.dtype)            # (N, M, d)
    return x.masked_fill(pad[..., None], 0.0)   # pads are exactly 0 and pass no gradient on


class HyperEncoder(nn.Module):
    """Embeds a hypertoken from the embeddings of its base tokens (config.hyper_encoder):

    - "transformer": a small bidirectional transformer over the M slots (pads masked), narrower
      than the model (it runs on about one new entry at every decoding step, so its weights
      must be cheap to read), then a masked mean over the slots;
    - "mlp": an MLP over the M slot embeddings laid side by side (pads are exactly 0);
    - "mean": the mean of the base embeddings, nothing learned (the paper's weaker baseline).
    The first two add a zero-initialised projection to that mean: at initialisation a hypertoken
    is exactly the mean of its base embeddings, a sensible point to start from (a random
    encoder's output can be tens of times the norm of a token embedding).
    """

    def __init__(self, config):
        super().__init__()
        self.kind, M, d, dh = config.hyper_encoder, config.max_subtokens, config.n_embd, config.hyper_n_embd
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
        self.ln_f = LayerNorm(dh, bias=config.bias)
        self.proj = nn.Linear(dh, d, bias=config.bias)

    def forward(self, contents, lengths, table):
        # contents (U, M) base ids, lengths (U,), table (V, d) the base embeddings -> (U, d)
        U, M = contents.size()
        w = ((self.slots < lengths[:, None]) / lengths[:, None]).to(table.dtype)  # (U, M): mean weights, pads 0
        if self.kind == "mean":
            return torch.einsum("um,umd->ud", w, F.embedding(contents, table))
        x = self.embed_slots(contents, lengths, table, self.slot_pos)      # (U, M, d), pads are 0
        mean = torch.einsum("um,umd->ud", w, x - self.slot_pos.to(x.dtype))  # (U, d): of the base embeddings
        if self.kind == "mlp":
            # (U, M * d), spelled out: view(U, -1) cannot size a batch with no contents (U = 0)
            return mean + self.proj(self.mlp(x.view(U, M * x.size(-1))))
        # attention over a content's own slots: log w is -inf on pads and the same number on every
        # real slot of a content, and softmax ignores a constant shift (one op, where a boolean
        # mask costs three)
        keys = w.log()[:, None, None, :]                                    # (U, 1, 1, M)
        h = self.c_in(x)                                                    # (U, M, dh)
        for block in self.blocks:
            h = block(h, keys)
        return mean + self.proj(torch.einsum("um,umd->ud", w, self.ln_f(h)))


class Canon(NamedTuple):
    """What the canonical mask (DESIGN.md 2.1) needs to know at a position (leading shape ...),
    about the encoder's current match and each hyper column j of the logits."""
    match: torch.Tensor    # (...) the code of the encoder's current match; -1: none
    parent: torch.Tensor   # (..., K + 1) the code column j's entry extended by one base id;
                           #   -2 where column j holds no installed entry (nobody's child)
    first: torch.Tensor    # (..., K + 1) the first base id of column j's code
    last: torch.Tensor     # (..., K + 1) its last base id


def vocabulary_logits_(base, hyper_logits, invalid, canon=None):
    """The next-code logits over the exact vocabulary (DESIGN.md 2) and, with canon, only the
    canonical codes (DESIGN.md 2.1): the one rule of training, scoring and decoding.

    base (..., V): the base logits, masked in place (hence the underscore); hyper_logits (..., K + 1):
    the hypertoken logits, column j < n entry j and column n the pending id (n: the entries
    installed); invalid (..., K + 1): the columns that are no valid code (j > n, and n when no
    pending id exists). Returns (..., V + K + 1): column V + j is hypertoken V + j, every invalid
    or non-canonical code -inf.
    """
    if canon is not None:
        # The children of the current match (installed entries that extend it by one base id):
        # the greedy encoder would have kept matching into them, so their last base ids cannot
        # start the next code, and nor can any hypertoken that starts with one of those base ids.
        # (log 1 = 0 and log 0 = -inf: the ban, in the logits' dtype, in three ops.)
        ban = (canon.parent != canon.match[..., None]).to(base.dtype).log()    # (..., K + 1)
        base.scatter_add_(-1, canon.last, ban)                                 # -inf at those base ids
        invalid = invalid | (base.gather(-1, canon.first) == float("-inf"))
    return torch.cat([base, hyper_logits.masked_fill(invalid, float("-inf"))], dim=-1)


def token_nll(logits, targets):
    """Negative log-likelihood of each target (same shape as targets, fp32), 0 where it is -1.
    Computed in the logits' own dtype with fp32 accumulation (autocast off): a bf16 model never
    holds an fp32 copy of its (B, T, V + K + 1) logits."""
    with torch.autocast(logits.device.type, enabled=False):
        nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")
    return nll.float().view(targets.shape)


@dataclass
class GPTConfig:
    block_size: int = 1024          # context, in codes: on code it holds about twice the text of BPE
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
    hyper_encoder: str = "transformer"  # transformer | mlp | mean (the paper: 1-2 layers beat the mean)
    hyper_n_layer: int = 1          # hyper-encoder depth: 1-2 layers beat mean pooling in the paper
    hyper_n_embd: int = 0           # its width; 0: n_embd // 4, which keeps the extra work of a
    hyper_n_head: int = 4           #   decoding step (about one new entry) at a few percent
    tie_weights: bool = True        # one table (and one hyper-encoder) for input and output, as GPT-2
    recon_lambda: float = 0.1       # weight of the reconstruction loss (paper: 0.1); 0 turns it off
    recon_max_entries: int = 256    # hypertokens per batch it is computed on: it needs (N*M, V) logits

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size}: must be >= 2 (a full context keeps its last "
                             f"block_size // 2 codes, and generation needs at least one)")
        positive = ("vocab_size", "n_layer", "n_head", "n_embd", "max_subtokens", "hyper_n_layer", "hyper_n_head")
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.hyper_encoder not in ("transformer", "mlp", "mean"):
            raise ValueError(f"hyper_encoder={self.hyper_encoder!r}: expected transformer, mlp or mean")
        if self.max_codebook_size < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"need max_codebook_size >= 0 and 0 <= dropout < 1, got {self.max_codebook_size}, "
                             f"{self.dropout}")
        if self.hyper_n_embd == 0:
            self.hyper_n_embd = max(self.n_embd // 4 // self.hyper_n_head, 1) * self.hyper_n_head
        if self.hyper_n_embd % self.hyper_n_head:
            raise ValueError(f"hyper_n_embd={self.hyper_n_embd} is not a multiple of hyper_n_head={self.hyper_n_head}")

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
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
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

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

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
        mean NLL of the targets, "recon": the reconstruction loss, when there is one}.
        """
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
            table_in = h_in[hyper.entries]                                    # (B, K, d)
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
        """The logits over each position's exact (and canonical) vocabulary (DESIGN.md 2, 2.1):
        base (B, T, V), masked in place, joined with the scores of the row's installed entries and
        its pending id. x (B, T, d) the final hidden states; h_out (U, d) the contents' output
        hyper-embeddings. Returns (B, T, V + K + 1)."""
        B, T, _ = x.size()
        K = hyper.entries.size(1)
        table = h_out[hyper.entries]                                          # (B, K, d)
        # the pending id's vector; -1 (no pending id) reads an appended row of zeros
        pending_vec = torch.cat([h_out, h_out.new_zeros(1, x.size(-1))])[hyper.pending_index]   # (B, T, d)
        pending_logit = torch.einsum("btd,btd->bt", x, pending_vec)[..., None]                 # (B, T, 1)
        hyper_logits = torch.cat([x @ table.transpose(1, 2), pending_logit], dim=-1)          # (B, T, K + 1)
        col, n = torch.arange(K + 1, device=x.device), hyper.n_installed[..., None]            # (K + 1,), (B, T, 1)
        hyper_logits = torch.where(col == n, pending_logit, hyper_logits)     # the pending id is V + n
        invalid = col >= n + (hyper.pending_index >= 0)[..., None]            # (B, T, K + 1)
        canon = None
        if self.config.canonical:
            ends = F.pad(hyper.contents[hyper.entries], (0, 0, 0, 1))         # (B, K + 1, M): column K a pad
            lengths = F.pad(hyper.lengths[hyper.entries], (0, 1), value=1)   # (B, K + 1)
            last = ends.gather(-1, lengths[..., None] - 1)[..., 0]            # (B, K + 1)
            # column n is the pending id, not entry n: it is nobody's child, and its first base id
            # is the match's (an entry is nobody's child before it is installed, either)
            pending_first = torch.cat([hyper.contents[:, 0], hyper.contents.new_zeros(1)])[hyper.pending_index]
            canon = Canon(match=hyper.match,
                          parent=torch.where(col < n, F.pad(hyper.parents, (0, 1), value=-2)[:, None], -2),
                          first=torch.where(col == n, pending_first[..., None], ends[:, None, :, 0]),
                          last=last[:, None].expand(B, T, K + 1))
        return vocabulary_logits_(base, hyper_logits, invalid, canon)

    def reconstruction_loss(self, h, contents, lengths):
        """The paper's auxiliary loss: each slot's base id from the hyper-embedding, by f_psi.
        0 when there are no contents (U = 0)."""
        U, M = contents.size()
        n = min(U, self.config.recon_max_entries)
        pick = torch.randperm(U, device=h.device)[:n]                         # a random subsample
        z = torch.einsum("nd,sde->nse", h[pick], self.recon)                  # (n, M, d)
        logits = self.lm_head(self.transformer.ln_f(z))                       # (n, M, V)
        target = contents[pick].masked_fill(torch.arange(M, device=h.device) >= lengths[pick, None], -1)
        return token_nll(logits, target).sum() / (target >= 0).sum().clamp(min=1)

    # -------------------------------------------------------------------------
    # Likelihoods (DESIGN.md 2.2); the multi-view sums over segmentations are in multiview.py
    #
    # A model writes on past any text, so the likelihood of a text is the probability that the
    # model's base tokens *start with* it. All the streams that spell a text and go on share their
    # codes up to the text's last code; there, any valid code whose content starts with the last
    # code's may stand (it may run past the text): the prefix probability sums them.

    def last_code_choices(self, codes):
        """The codes that may stand at the last position of `codes` when their text goes on: every
        valid code there whose content starts with the last code's (DESIGN.md 2.2)."""
        lzw = self.codec()
        for t, code in enumerate(codes[:-1]):
            lzw.push(code, t)
        return lzw.starting_with(lzw.resolve(codes[-1], len(codes) - 1))

    @torch.no_grad()
    def code_logprobs(self, rows, keep):
        """Teacher-force each row of codes. Returns, per row, (lp, dist): lp (n-1,) the log-prob of
        code t given the codes before it, t = 1..n-1; dist (n - keep, W) the whole next-code
        log-distribution at positions t = keep..n-1 (the row's keep). Rows that fit the context
        share one forward pass; a longer row is read by a Stepper, which crops it as generation
        does."""
        c, out = self.config, []
        short = [i for i, r in enumerate(rows) if len(r) <= c.block_size + 1]
        if short:
            T = max(len(rows[i]) for i in short) - 1
            x = torch.tensor([rows[i][:-1] + [0] * (T + 1 - len(rows[i])) for i in short], device=self.device)
            logp = F.log_softmax(self(x)[0].float(), dim=-1)                  # (B, T, W)
        for i, (row, k) in enumerate(zip(rows, keep)):
            n = len(row)
            if i in short:
                lp = logp[short.index(i), :n - 1]                               # (n - 1, W): position t at t - 1
                out.append((lp.gather(-1, torch.tensor(row[1:], device=lp.device)[:, None])[:, 0], lp[k - 1:]))
                continue
            step, lp, dist = Stepper(self), [], []
            width = c.vocab_size + (c.max_codebook_size + 1 if c.has_hypertokens else 0)   # every row's
            for t in range(1, n):
                step_logp = F.log_softmax(step.read(row[t - 1]).float(), dim=-1)
                lp.append(step_logp[row[t]])
                dist += [F.pad(step_logp, (0, width - step_logp.size(0)), value=float("-inf"))] if t >= k else []
            out.append((torch.stack(lp), torch.stack(dist)))
        return out

    def nll(self, codes, prefix=True):
        """Negative log-likelihood (nats) of codes[1:] given codes[0], one sequence. prefix=True:
        that the model's text starts with theirs (DESIGN.md 2.2: the last term sums every code
        that may stand at the last position); prefix=False: of exactly this finished stream."""
        codes = as_ids(codes, "codes")
        if len(codes) < 2:
            return 0.0
        lp, dist = self.code_logprobs([codes], [len(codes) - 1])[0]
        if not prefix:
            return -lp.sum().item()
        return -(lp[:-1].sum() + dist[0, self.last_code_choices(codes)].logsumexp(0)).item()

    @torch.no_grad()
    def loglikelihoods(self, context, continuations):
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
        c = self.config
        ctx, conts = as_ids(context, "context"), [as_ids(x, "continuation") for x in continuations]
        if not ctx or not conts or not all(conts):
            raise ValueError("loglikelihood needs a context of at least one id (the start) and non-empty continuations")
        for ids in [ctx] + conts:
            check_base_ids(ids, c.vocab_size)
        args = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
        head, rows = lzw_encode(ctx, *args), [lzw_encode(ctx + x, *args) for x in conts]
        k = len(head)                            # the context's last code stands at position k - 1
        spell_ctx = self.last_code_choices(head) if k > 1 else None
        out = []
        for row, (lp, dist) in zip(rows, self.code_logprobs(rows, [max(k - 1, 1)] * len(rows))):
            n, spell_all = len(row), self.last_code_choices(row)
            assert row[:k - 1] == head[:k - 1], "DESIGN.md 2.2: the streams share the codes before the context's last"
            logp = lp[max(k - 2, 0):n - 2].sum() + dist[-1, spell_all].logsumexp(0)   # positions k-1 .. n-2, then n-1
            if k > 1:
                logp = logp - dist[0, spell_ctx].logsumexp(0)
            greedy = True          # (a tie for the most probable counts as greedy)
            for t in range(max(k - 1, 1), n):
                step = dist[t - max(k - 1, 1)]
                best = step[spell_ctx].max() if t == k - 1 else step.max()
                greedy &= bool(step[spell_all if t == n - 1 else row[t]].max() >= best)
            out.append((logp.item(), greedy))
        return out

    def loglikelihood(self, context, continuation):
        """log P(continuation | context) in nats (base ids; see loglikelihoods)."""
        return self.loglikelihoods(context, [continuation])[0][0]

    def text_ids(self, text, tokenizer):
        """<|endoftext|> and the base ids of a text, once the tokenizer is checked to be the model's."""
        c = self.config
        settings = (tokenizer.vocab_size, tokenizer.max_codebook_size, tokenizer.max_subtokens)
        if settings != (c.vocab_size, c.max_codebook_size, c.max_subtokens) or \
                tokenizer.disabled_ids != frozenset(c.disabled_ids):
            raise ValueError(f"tokenizer (V, C, M) = {settings} and disabled ids do not match the model's "
                             f"{(c.vocab_size, c.max_codebook_size, c.max_subtokens)}")
        return [tokenizer.eot] + tokenizer.encode_base(text)

    def score(self, text, tokenizer):
        """(NLL in nats, UTF-8 bytes) of a text after an <|endoftext|>: the prefix NLL of its canonical
        codes (DESIGN.md 2.2; multiview.score sums over segmentations). bits per byte = nll / (ln 2
        * bytes): the same text gives comparable numbers for a plain and a zip2zip model, whatever
        their codes."""
        c = self.config
        codes = lzw_encode(self.text_ids(text, tokenizer), c.vocab_size, c.max_codebook_size, c.max_subtokens,
                           c.disabled_ids)
        return self.nll(codes), len(text.encode("utf-8"))   # a literal <|endoftext|> in the text is text: 13 bytes

    @property
    def device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # Generation, one code at a time (fastgen.py: the same, batched and compiled)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue each row of codes by max_new_tokens codes. idx: a (B, T) tensor, or a list of
        B lists of codes (prompts of different lengths). Returns the same kind, prompts included.
        Everything it returns decodes; temperature 0 or top_k=1 is greedy."""
        rows, out = prompt_rows(idx, temperature, top_k, max_new_tokens), []
        for b, row in enumerate(rows):       # rows never affect each other: one at a time
            row, stepper = list(row), Stepper(self)
            for code in row:                 # read the prompt: its codebook grows as it is read
                logits = stepper.read(code)
            for _ in range(max_new_tokens):
                code = sample(logits[None], temperature, top_k).item()      # draw the next code
                if code < 0:   # only possible with a canonical model and no disabled id (DESIGN.md 2.1)
                    raise ValueError(f"row {b} has no valid next code: every code is masked")
                row.append(code)
                logits = stepper.read(code)  # read it: new entries, then the next code's logits
            out.append(row)
        return torch.tensor(out, dtype=idx.dtype, device=idx.device) if torch.is_tensor(idx) else out


def check_targets(logits, targets, hyper, vocab_size):
    """ValueError naming the first target the model cannot emit at its position: not a valid next
    code there (DESIGN.md 2), or with canonical=True not canonical (DESIGN.md 2.1)."""
    W = logits.size(-1)
    score = logits.gather(-1, targets.clamp(0, W - 1)[..., None])[..., 0]
    ok = (targets == -1) | ((targets >= 0) & (targets < W) & (score > float("-inf")))
    if not ok.all():
        b, t = (~ok).nonzero()[0].tolist()
        n = hyper.n_installed[b, t].item() if hyper is not None else 0
        has = hyper is not None and hyper.pending_index[b, t].item() >= 0
        code = targets[b, t].item()
        why = "it is not canonical: its first base token extends the encoder's match (DESIGN.md 2.1)" \
            if 0 <= code < vocab_size + n + has else \
            f"base ids < {vocab_size}, {n} installed hypertokens{', and the pending id' if has else ''}"
        raise ValueError(f"target {code} at row {b}, position {t} is not a valid next code there ({why})")


def prompt_rows(idx, temperature, top_k, max_new_tokens):
    """The prompts of generate as lists of codes; ValueError for a setting it cannot use."""
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, or None for every code; got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    rows = idx.tolist() if torch.is_tensor(idx) else [as_ids(r, "prompt") for r in idx]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs at least one prompt and no empty prompt "
                         "(start from <|endoftext|> for an unconditional sample)")
    return rows


def sample(logits, temperature, top_k):
    """The next code of each row (B,) from its logits (B, W), -1 where a row has no valid code.

    Greedy when temperature is 0 or top_k is 1; else a draw from softmax(logits / temperature)
    over the top_k codes, as argmax(p / q) with q ~ Exp(1) (the "exponential race": the same
    distribution as torch.multinomial, with no host sync)."""
    dead = torch.isneginf(logits).all(-1)
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1).masked_fill(dead, -1)
    # Subtle: the best logit is shifted to 0 before the division, so a tiny temperature sends the
    # others to -inf (never inf - inf = NaN): the draw tends to greedy. A divisor below float32's
    # range would round to 0, so it is held at 1e-30, where the draw is already greedy.
    logits = logits.float()
    logits, top = (logits - logits.amax(-1, keepdim=True)) / max(temperature, 1e-30), None
    if top_k is not None:
        logits, top = torch.topk(logits, min(top_k, logits.size(-1)))     # (B, k) and their codes
    probs = F.softmax(logits, dim=-1)
    # only codes of positive probability race: a masked code (p = 0) drawn with q = 0 would
    # score 0 / 0 = NaN, which argmax takes for the largest
    race = probs / torch.empty_like(probs).exponential_(1)
    nxt = torch.where(probs > 0, race, -1.0).argmax(-1)
    nxt = nxt if top is None else top.gather(-1, nxt[:, None])[:, 0]
    return nxt.masked_fill(dead, -1)


class Stepper:
    """KV-cached reading of one row of codes, one code at a time: read(code) returns the logits of
    the code after it, (V + n + 1,) with n installed hypertokens (V + n: the pending id).

    It keeps the row's LZW decoder (DESIGN.md 1.1), whose codebook grows as it reads, the
    hyper-embeddings of the entries (encoded once, when installed) and every layer's keys and
    values. A full context keeps its last block_size // 2 codes (their keys and values computed
    again, at positions from 0) and goes on: the codebook lives on.
    """

    def __init__(self, model):
        c, w = model.config, model.transformer.wte.weight
        self.model, self.lzw, self.context = model, model.codec(), []    # context: the codes in the cache
        self.table_in = self.table_out = w.new_zeros(0, c.n_embd)       # (n, d): entry j's hyper-embeddings
        # the cache in the compute dtype: autocast's if it is on (bf16 on a GPU), else the weights'
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        shape = (c.n_layer, 1, c.n_head, c.block_size, c.n_embd // c.n_head)   # (layer, 1, nh, block, hs)
        self.k, self.v = w.new_zeros(shape, dtype=dtype), w.new_zeros(shape, dtype=dtype)

    def encode(self, contents):
        """Input and output hyper-embeddings (N, d) of a list of contents (tuples of base ids)."""
        M, device = self.model.config.max_subtokens, self.model.device
        padded = torch.tensor([e + (0,) * (M - len(e)) for e in contents], device=device)     # (N, M)
        return self.model.hyper_tables(padded, torch.tensor([len(e) for e in contents], device=device))

    @torch.no_grad()
    def read(self, code):
        c, n = self.model.config, self.lzw.n_entries
        self.lzw.push(code, len(self.context))    # decode it (ValueError if it is no valid code here)
        if self.lzw.n_entries > n:                # the entries it installed: encode them once
            h_in, h_out = self.encode(self.lzw.entries[n:])
            self.table_in, self.table_out = torch.cat([self.table_in, h_in]), torch.cat([self.table_out, h_out])
        if len(self.context) == c.block_size:     # full: keep the last block_size // 2, this code included
            kept, self.context = self.context[len(self.context) - (c.block_size // 2 - 1):], []
            for old in kept:
                self.attend(old)
        return self.next_logits(self.attend(code))

    def attend(self, code):
        """Run a code through the blocks at the next position, its keys and values into the cache;
        returns its final hidden state (d,)."""
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
        pending, n = lzw.pending(), lzw.n_entries
        # the pending id scores with its content's vector: hyper column n (zeros when there is none)
        pending_vec = self.encode([pending])[1] if pending else x.new_zeros(1, c.n_embd)
        hyper_logits = torch.cat([self.table_out, pending_vec.to(self.table_out.dtype)]) @ x   # (n + 1,)
        invalid = torch.arange(n + 1, device=x.device) >= n + (pending is not None)
        canon = None
        if c.canonical:   # the trie: each entry's parent, first and last base id; the pending id is no child
            trie = [(p, e[0], e[-1]) for p, e in zip(lzw.parents, lzw.entries)] + [(-2, (pending or (0,))[0], 0)]
            canon = Canon(torch.tensor(lzw.code, device=x.device), *torch.tensor(trie, device=x.device).T)
        return vocabulary_logits_(base, hyper_logits, invalid, canon)
