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

Layout: the LZW codec, the tokenizer, then the model and its decoder. (Settings, checkpoints and
reports for the scripts are in cli.py and efficiency.py.)
"""

import codecs
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np

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
        edges, entries, emit = self.edges, self.entries, out.append
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
        """Decode codes; after each, record the number of installed entries and the code of the
        match whose pending extension (see pending()) is possible, or -1. The fast path of
        push() + pending() for whole sequences (the model needs both at every position)."""
        V, C, edges, entries, sink = self.V, self.C, self.edges, self.entries, []
        n_after, pending_after = [], []
        for t, code in enumerate(codes):
            self.feed(self.resolve(code, t) if code >= V else (code,), sink)
            n, cur = len(entries), self.code
            n_after.append(n)
            first = cur if cur < V else entries[cur - V][0]
            pending_after.append(cur if cur >= 0 and n < C and cur * V + first not in edges else -1)
        return n_after, pending_after

    def push(self, code, position=None):
        """Decoder step: read one code. Returns (its base ids, the ids of the entries it installed)."""
        ids = self.resolve(code, position)
        n = len(self.entries)
        self.feed(ids, [])
        return ids, range(self.V + n, self.V + len(self.entries))


def _check_base_ids(ids, vocab_size, offset=0):
    if len(ids) and not (0 <= min(ids) and max(ids) < vocab_size):
        i = next(i for i, t in enumerate(ids) if not 0 <= t < vocab_size)
        raise ValueError(f"base id {ids[i]} at position {offset + i} is outside the base vocabulary "
                         f"0..{vocab_size - 1}")


def _as_list(ids):
    return ids if isinstance(ids, list) else ids.tolist() if hasattr(ids, "tolist") else list(ids)


def lzw_encode(ids, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Compress base ids to codes. Example (V=100): [1,2,1,2,1] -> [1, 2, 100, 1]."""
    ids = _as_list(ids)
    _check_base_ids(ids, vocab_size)
    lzw, out = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), []
    lzw.feed(ids, out)
    lzw.flush(out)
    return out


def lzw_decode(codes, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Expand codes to base ids. Any valid stream decodes, canonical or not:
    [1, 2, 100, 1] -> [1,2,1,2,1], and so does [1, 2, 1, 2, 1]."""
    lzw, ids, fed = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), [], 0
    for i, code in enumerate(_as_list(codes)):
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


def lzw_encode_window(ids, start, n_codes, vocab_size, max_codebook_size, max_subtokens,
                      disabled_ids=()):
    """The first n_codes codes of the canonical encoding of ids[start:], fresh codebook.

    Returns (codes, n_base): n_base is how many base ids the codes stand for, so the next
    window can start at start + n_base and no text is lost between windows. Fewer codes come
    back only where the input runs out.
    """
    lzw, out, pos = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), [], start
    while len(out) < n_codes and pos < len(ids):
        # Each code covers at least one base id, so this many more never overshoots by much.
        chunk = _as_list(ids[pos:pos + n_codes - len(out)])
        _check_base_ids(chunk, vocab_size, pos)
        lzw.feed(chunk, out)
        pos += len(chunk)
    if pos >= len(ids):
        lzw.flush(out)
    codes = out[:n_codes]
    return codes, sum(len(lzw.content(c)) for c in codes)

# -----------------------------------------------------------------------------
# Tokenizer: text -> GPT-2 BPE base ids (tiktoken r50k_base) -> LZW codes, and back


RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def gpt2_bpe(path=None):
    """GPT-2's BPE as a tiktoken Encoding (r50k_base), built from the ranks file shipped in this
    repository (OpenAI's, MIT licensed), so that nothing is ever downloaded. Same ids as
    tiktoken.get_encoding("r50k_base"). OSError with the path if the file is missing or damaged."""
    import base64
    import hashlib
    import tiktoken  # imported here so that the codec above needs nothing but the stdlib
    from tiktoken_ext import openai_public
    path = path or RANKS
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OSError(f"GPT-2's BPE ranks (r50k_base) are missing: {e}; they ship with the repository "
                      f"as {os.path.relpath(RANKS)} (restore it with git checkout)") from None
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise OSError(f"{path} is damaged (its sha256 is not r50k_base's): restore it with git checkout")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    # the split pattern as tiktoken writes it (older versions inline it in their gpt2 definition)
    pattern = getattr(openai_public, "r50k_pat_str",
                      r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    return tiktoken.Encoding("r50k_base", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


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

    @classmethod
    def for_model(cls, config):
        """The tokenizer a model (a GPTConfig) was trained with: its C, M and disabled ids, which
        are <|endoftext|> alone, or with every digit token (no_digit_merges)."""
        if config.vocab_size != 50257:
            raise ValueError(f"the model's base vocabulary has {config.vocab_size} ids, GPT-2 BPE has 50257")
        for no_digit_merges in (False, True):
            tok = cls(config.max_subtokens, config.max_codebook_size, no_digit_merges)
            if tok.disabled_ids == frozenset(config.disabled_ids):
                return tok
        raise ValueError(f"the model's disabled ids ({len(config.disabled_ids)} of them) are neither "
                         f"<|endoftext|> alone nor <|endoftext|> and every token with a digit")

    def codec(self):
        """A fresh LZW state with this tokenizer's settings (for incremental decoding)."""
        return LZW(self.vocab_size, self.max_codebook_size, self.max_subtokens, self.disabled_ids)

    def encode_base(self, text):
        return self.bpe.encode(text, allowed_special={"<|endoftext|>"})

    def encode(self, text):
        return lzw_encode(self.encode_base(text), self.vocab_size, self.max_codebook_size,
                          self.max_subtokens, self.disabled_ids)

    def decode_base(self, ids):
        return self.bpe.decode(ids)

    def decode(self, codes):
        return self.decode_base(lzw_decode(codes, self.vocab_size, self.max_codebook_size,
                                           self.max_subtokens, self.disabled_ids))

    def n_bytes(self, ids):
        """UTF-8 bytes of the text that base ids stand for (the denominator of bits per byte)."""
        return int(self.byte_lengths[np.asarray(ids, dtype=np.int64)].sum())

    def segments(self, codes):
        """[(code, text)] for each code. Text is decoded incrementally, so a character split
        across codes is shown with the code that completes it."""
        lzw, utf8, out = self.codec(), codecs.getincrementaldecoder("utf-8")("replace"), []
        for i, code in enumerate(codes):
            ids, _ = lzw.push(code, i)
            out.append((code, utf8.decode(b"".join(self.token_bytes[t] for t in ids))))
        if out:
            out[-1] = (out[-1][0], out[-1][1] + utf8.decode(b"", final=True))
        return out


# -----------------------------------------------------------------------------
# What the model needs to know about each row's codebook, position by position
#
# The codebook of a row is a function of the row's codes: decode them and record, after each
# position t, how many entries are installed (n_t) and the pending content (if any). The
# hyper-encoder output depends only on an entry's base ids, so contents are deduplicated across
# the whole batch and encoded once. Example (V=100, M=4), one row [7, 100, 101]:
#   after 7: n=0, pending (7,7) | after 100: n=1 ([7,7]), pending (7,7,7) | after 101: n=2, ...
#   contents: [(7,7), (7,7,7), ...], entries[0] = [0, 1], pending[0] = [0, 1, ...]


@dataclass
class HyperBatch:
    contents: "torch.Tensor"     # (U, M) int64: unique base-id contents, padded with 0
    lengths: "torch.Tensor"      # (U,) int64: their lengths, 2..M
    entries: "torch.Tensor"      # (B, K) int64: row b's hypertoken V+j is contents[entries[b, j]]
    n_installed: "torch.Tensor"  # (B, T) int64: entries installed after reading codes 0..t
    pending: "torch.Tensor"      # (B, T) int64: index of the pending content after t, or -1

    def to(self, device):
        return HyperBatch(*(getattr(self, f).to(device, non_blocking=True) for f in
                            ("contents", "lengths", "entries", "n_installed", "pending")))


def hyper_batch(rows, vocab_size, max_codebook_size, max_subtokens, disabled_ids=()):
    """Decode each row of codes (a list of lists, all of length T) into a HyperBatch."""
    import torch
    index, contents = {}, []               # content -> its index in `contents`

    def content_id(c):
        if c not in index:
            index[c] = len(contents)
            contents.append(c)
        return index[c]

    entries, n_installed, pending = [], [], []
    for row in rows:
        lzw = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids)
        n_row, match = lzw.trace(row)
        ids = {-1: -1}                     # match code -> index of its pending content
        for m in set(match) - {-1}:
            buf = lzw.content(m)
            ids[m] = content_id(buf + (buf[0],))
        entries.append([content_id(e) for e in lzw.entries])
        n_installed.append(n_row)
        pending.append([ids[m] for m in match])
    K = max((len(e) for e in entries), default=0)
    M = max_subtokens
    tensor = lambda a, *shape: torch.from_numpy(np.array(a, dtype=np.int64).reshape(shape))
    return HyperBatch(
        contents=tensor([c + (0,) * (M - len(c)) for c in contents], -1, M),
        lengths=tensor([len(c) for c in contents], -1),
        entries=tensor([e + [0] * (K - len(e)) for e in entries], len(rows), K),
        n_installed=tensor(n_installed, len(rows), -1),
        pending=tensor(pending, len(rows), -1))


# -----------------------------------------------------------------------------
# The model: nanoGPT's GPT, plus a hyper-encoder for the hypertoken rows

import torch  # noqa: E402  (the codec above runs without torch; the model needs it)
import torch.nn as nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import kernels  # noqa: E402


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
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, causal

    def forward(self, x, mask=None, cache=None):
        # mask: (B, 1, T, Tk) bool, True where attention is allowed; cache: a KVCache layer view
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)                                   # (B, nh, Tk, hs)
        dropout = self.dropout if self.training else 0.0
        causal = self.causal and mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                # (B, T, C)
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


class HyperEncoder(nn.Module):
    """Embeds a hypertoken from the embeddings of its base tokens.

    A small bidirectional transformer over the M slots (pads masked), at a narrower width than
    the model (it runs once per new entry at every decoding step, so its weights must be cheap
    to read), masked mean pooling, and a zero-initialised output projection added to the mean
    of the base embeddings: at initialisation a hypertoken is exactly the mean of its base
    embeddings, a sensible point to start from. A random encoder's output can be tens of times
    the norm of a token embedding.
    """

    def __init__(self, config):
        super().__init__()
        inner = replace(config, n_embd=config.hyper_n_embd, n_head=config.hyper_n_head)
        self.slot_pos = nn.Parameter(torch.randn(config.max_subtokens, config.n_embd) * 0.02)
        self.c_in = nn.Linear(config.n_embd, inner.n_embd, bias=config.bias)
        self.blocks = nn.ModuleList([Block(inner, causal=False) for _ in range(config.hyper_n_layer)])
        self.ln_f = LayerNorm(inner.n_embd, bias=config.bias)
        self.proj = nn.Linear(inner.n_embd, config.n_embd, bias=config.bias)

    def forward(self, contents, lengths, table):
        # contents (U, M) base ids, lengths (U,), table (V, d) the base embeddings -> (U, d)
        U, M = contents.size()
        x = kernels.gather_slots(contents, lengths, table, self.slot_pos)   # (U, M, d), pads are 0
        valid = torch.arange(M, device=contents.device) < lengths[:, None]  # (U, M)
        denom = lengths[:, None].to(x.dtype)
        # the mean of the base embeddings alone (the slot positions are taken back out)
        mean = (x.sum(1) - self.slot_pos.to(x.dtype).cumsum(0)[lengths - 1]) / denom  # (U, d)
        h = self.c_in(x)                                                    # (U, M, dh)
        for block in self.blocks:
            h = block(h, valid[:, None, None, :])                           # keys: (U, 1, 1, M)
        h = (self.ln_f(h) * valid[..., None]).sum(1) / denom                # (U, dh)
        return mean + self.proj(h)                                          # (U, d)


def masked_hyper_logits(x, table, n_installed, pending, has_pending):
    """Scores of the hypertoken ids V, V+1, ... over the exact causal vocabulary (DESIGN.md 2).

    x (B, T, d) hidden states; table (B, K, d) each row's entry vectors; n_installed (B, T);
    pending (B, T, d) the vector of the pending content and has_pending (B, T) whether it exists.
    Returns (B, T, K + 1): column j < n_t scores entry j, column n_t the pending id, rest -inf.
    """
    B, T, _ = x.size()
    K = table.size(1)
    logits = x @ table.transpose(1, 2)                                     # (B, T, K)
    logits = torch.cat([logits, logits.new_zeros(B, T, 1)], dim=-1)        # room for n_t == K
    col = torch.arange(K + 1, device=x.device)
    n = n_installed[..., None]                                             # (B, T, 1)
    logits = torch.where(col == n, (x * pending).sum(-1, keepdim=True), logits)
    valid = (col < n) | ((col == n) & has_pending[..., None])
    return logits.masked_fill(~valid, float("-inf"))


def check_targets(targets, hyper, vocab_size):
    """ValueError naming the first target outside the causal vocabulary of its position."""
    n = hyper.n_installed if hyper is not None else torch.zeros_like(targets)
    has = hyper.pending >= 0 if hyper is not None else torch.zeros_like(targets, dtype=torch.bool)
    ok = (targets == -1) | ((targets >= 0) & (targets < vocab_size + n)) | ((targets == vocab_size + n) & has)
    if not ok.all():
        b, t = (~ok).nonzero()[0].tolist()
        raise ValueError(f"target {targets[b, t].item()} at row {b}, position {t} is not a valid next code "
                         f"there (base ids < {vocab_size}, {n[b, t].item()} installed hypertokens"
                         f"{', and the pending id' if has[b, t] else ''})")


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
    hyper_n_layer: int = 1          # hyper-encoder depth: 1-2 layers beat mean pooling in the paper
    hyper_n_embd: int = 0           # its width; 0: n_embd // 4, which keeps the extra work of a
    hyper_n_head: int = 4           #   decoding step (about one new entry) at a few percent
    tie_weights: bool = True        # one table (and one hyper-encoder) for input and output, as GPT-2
    recon_lambda: float = 0.1       # weight of the reconstruction loss (paper: 0.1); 0 turns it off
    recon_max_entries: int = 256    # hypertokens per batch it is computed on: it needs (N*M, V) logits

    def __post_init__(self):
        if self.hyper_n_embd == 0:
            self.hyper_n_embd = max(self.n_embd // 4 // self.hyper_n_head, 1) * self.hyper_n_head

    @property
    def hyper(self):
        return self.max_subtokens > 1


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
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
        if config.hyper:   # M=1: no hypertokens, no extra parameters: exactly nanoGPT's GPT
            self.hyper_in = HyperEncoder(config)
            self.hyper_out = self.hyper_in if config.tie_weights else HyperEncoder(config)
            # f_psi of the reconstruction loss: one linear map per slot, then the base unembedding
            self.recon = nn.Parameter(torch.zeros(config.max_subtokens, config.n_embd, config.n_embd))
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):   # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.hyper:
            for enc in {self.hyper_in, self.hyper_out}:
                nn.init.zeros_(enc.proj.weight)
            nn.init.normal_(self.recon, std=1 / math.sqrt(config.n_embd))
        self.last_losses = {}

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

    def forward(self, idx, targets=None, hyper=None):
        """idx (B, T) codes -> logits (B, T, V [+ K + 1]) and, with targets, the loss.

        Column V + j is hypertoken V + j. hyper: the rows' HyperBatch; derived from idx if None.
        """
        c, device = self.config, idx.device
        B, T = idx.size()
        assert T <= c.block_size, f"Cannot forward sequence of length {T}, block size is only {c.block_size}"
        wte = self.transformer.wte.weight
        derived = c.hyper and hyper is None
        if c.hyper:
            if derived:
                hyper = self.hyper_batch(idx.tolist()).to(device)
            h_in, h_out = self.hyper_tables(hyper.contents, hyper.lengths)    # (U, d) each
            table_in = h_in[hyper.entries]                                    # (B, K, d)
        else:
            table_in = wte.new_zeros(B, 0, c.n_embd)
        tok_emb = kernels.hyper_embedding(idx, wte, table_in, c.vocab_size)   # (B, T, d)
        pos_emb = self.transformer.wpe(torch.arange(T, device=device))        # (T, d)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)                                              # (B, T, V)
        if c.hyper:
            pend = h_out[hyper.pending.clamp(min=0)]                          # (B, T, d)
            table_out = table_in if c.tie_weights else h_out[hyper.entries]   # (B, K, d)
            hyper_logits = masked_hyper_logits(x, table_out, hyper.n_installed,
                                               pend, hyper.pending >= 0)
            logits = torch.cat([logits, hyper_logits], dim=-1)                # (B, T, V + K + 1)
        if targets is None:
            return logits, None
        if derived:
            # Checked where it costs no extra device sync; a loader's HyperBatch comes from the
            # encoder itself. An invalid target would otherwise make the loss silently inf.
            check_targets(targets, hyper, c.vocab_size)
        lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                  ignore_index=-1)
        loss, self.last_losses = lm_loss, {"lm": lm_loss.detach()}
        if c.hyper and c.recon_lambda > 0 and c.recon_max_entries > 0 and hyper.contents.size(0) > 0:
            recon = self.reconstruction_loss(h_in, hyper.contents, hyper.lengths)
            loss = loss + c.recon_lambda * recon
            self.last_losses["recon"] = recon.detach()
        return logits, loss

    def reconstruction_loss(self, h, contents, lengths):
        """The paper's auxiliary loss: each slot's base id from the hyper-embedding, by f_psi."""
        U, M = contents.size()
        n = min(U, self.config.recon_max_entries)
        pick = torch.randperm(U, device=h.device)[:n]                         # a random subsample
        z = torch.einsum("nd,sde->nse", h[pick], self.recon)                  # (n, M, d)
        logits = self.lm_head(self.transformer.ln_f(z))                       # (n, M, V)
        target = contents[pick].masked_fill(torch.arange(M, device=h.device) >= lengths[pick, None], -1)
        return F.cross_entropy(logits.view(n * M, -1).float(), target.view(-1), ignore_index=-1)

    # -------------------------------------------------------------------------
    # Scoring and generation, through the KV-cached incremental decoder below

    @torch.no_grad()
    def nll(self, codes):
        """Total negative log-likelihood (nats) of codes[1:] given codes[0], one sequence.

        Teacher-forced when it fits the context, else replayed through the KV-cached decoder
        (cropping as generation does). Both agree where both apply (tested)."""
        if len(codes) < 2:
            return 0.0
        if len(codes) <= self.config.block_size + 1:
            idx = torch.tensor([codes[:-1]], device=self.device)
            logits, _ = self(idx)
            logp = F.log_softmax(logits.float(), dim=-1)[0]
            return -logp[torch.arange(len(codes) - 1), torch.tensor(codes[1:], device=self.device)].sum().item()
        dec, total = IncrementalDecoder(self, [codes[:1]]), 0.0
        for code in codes[1:]:
            total -= F.log_softmax(dec.logits().float(), dim=-1)[0, code].item()
            dec.advance([code])
        return total

    def score(self, text, tokenizer):
        """(NLL in nats, UTF-8 bytes) of a text, encoded canonically after an <|endoftext|>.

        bits per byte = nll / (ln 2 * bytes): the same text gives comparable numbers for a plain
        and a zip2zip model, whatever their codes."""
        c = self.config
        settings = (tokenizer.vocab_size, tokenizer.max_codebook_size, tokenizer.max_subtokens)
        if settings != (c.vocab_size, c.max_codebook_size, c.max_subtokens) or \
                tokenizer.disabled_ids != frozenset(c.disabled_ids):
            raise ValueError(f"tokenizer (V, C, M) = {settings} and disabled ids do not match the model's "
                             f"{(c.vocab_size, c.max_codebook_size, c.max_subtokens)}")
        ids = [tokenizer.eot] + tokenizer.encode_base(text)
        return self.nll(lzw_encode(ids, *settings, tokenizer.disabled_ids)), tokenizer.n_bytes(ids)

    @property
    def device(self):
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue each row of codes by max_new_tokens codes. idx: a (B, T) tensor, or a list of
        B lists of codes (prompts of different lengths). Returns the same kind, prompts included.
        Everything it returns decodes; temperature 0 or top_k=1 is greedy."""
        rows = idx.tolist() if torch.is_tensor(idx) else [list(r) for r in idx]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("generate needs at least one prompt and no empty prompt "
                             "(start from <|endoftext|> for an unconditional sample)")
        dec = IncrementalDecoder(self, rows)
        for _ in range(max_new_tokens):
            logits = dec.logits().float()                                 # (B, V + K + 1)
            if temperature == 0 or top_k == 1:
                nxt = logits.argmax(-1)                                   # greedy
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("Inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]
            dec.advance(nxt.tolist())                                     # -inf outside the valid set,
        out = dec.rows                                                    # so every code decodes
        return torch.tensor(out, dtype=idx.dtype, device=idx.device) if torch.is_tensor(idx) else out




class KVCache:
    """Keys and values of every layer, for B rows and up to block_size positions."""

    def __init__(self, config, B, device, dtype):
        nh, hs = config.n_head, config.n_embd // config.n_head
        shape = (config.n_layer, B, nh, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos, self.layer = 0, 0   # positions filled; the layer the next append is for

    def append(self, k, v):
        # k, v (B, nh, T, hs) of the current layer -> all keys and values so far (B, nh, pos+T, hs)
        i, end = self.layer, self.pos + k.size(2)
        self.k[i, :, :, self.pos:end], self.v[i, :, :, self.pos:end] = k, v
        self.layer += 1
        if self.layer == self.k.size(0):
            self.layer, self.pos = 0, end
        return self.k[i, :, :, :end], self.v[i, :, :, :end]


class IncrementalDecoder:
    """KV-cached decoding of B rows: read codes one step at a time, give next-code logits.

    Per row it keeps the LZW decoder state (DESIGN.md 1.1), the hyper-embeddings of the entries
    installed so far (each encoded once, when it appears: about one per step) and the vector of
    the pending content. Rows of different lengths are left-padded and masked. When the context
    is full it keeps the last block_size // 2 codes and re-computes their keys and values; the
    codebooks live on.
    """

    @torch.no_grad()
    def __init__(self, model, prompts):
        self.model, c = model, model.config
        self.rows = [list(p) for p in prompts]
        self.lzw = [model.codec() for _ in prompts]
        B, d, device = len(prompts), c.n_embd, model.device
        dtype = model.transformer.wte.weight.dtype
        self.hyper_seconds = 0.0      # time spent on hypertoken work (measured by bench.py)
        if c.hyper:
            self.table_in = torch.zeros(B, c.max_codebook_size, d, device=device, dtype=dtype)
            self.table_out = self.table_in if c.tie_weights else torch.zeros_like(self.table_in)
        new = []
        for b, (lzw, row) in enumerate(zip(self.lzw, self.rows)):
            for t, code in enumerate(row):
                lzw.push(code, t)
            new += [(b, j, e) for j, e in enumerate(lzw.entries)]
        self._update_hyper(new)
        self._prefill(c.block_size)

    def _update_hyper(self, new):
        """Encode the entries just installed ((row, j, content) triples) and every row's pending
        content, in one hyper-encoder call."""
        if not self.model.config.hyper:
            return
        t0 = time.perf_counter()
        pend = [lzw.pending() for lzw in self.lzw]
        contents = [e for _, _, e in new] + [p for p in pend if p is not None]
        h_in, h_out = self._encode(contents)
        if new:
            rows, cols = (torch.tensor(v, device=self.model.device) for v in zip(*((b, j) for b, j, _ in new)))
            self.table_in[rows, cols] = h_in[:len(new)]
            if self.table_out is not self.table_in:                       # untied weights
                self.table_out[rows, cols] = h_out[:len(new)]
        self.has_pending = torch.tensor([p is not None for p in pend], device=self.model.device)
        self.pending = self.table_out.new_zeros(len(pend), self.table_out.size(-1))
        self.pending[self.has_pending] = h_out[len(new):]
        self.hyper_seconds += time.perf_counter() - t0

    def _encode(self, contents):
        M, device = self.model.config.max_subtokens, self.model.device
        if not contents:
            empty = self.table_in.new_zeros(0, self.table_in.size(-1))
            return empty, empty
        padded = torch.tensor([e + (0,) * (M - len(e)) for e in contents], device=device)
        lengths = torch.tensor([len(e) for e in contents], device=device)
        return self.model.hyper_tables(padded, lengths)

    def _embed(self, idx, pos):
        # idx (B, T) codes, pos (B, T) position ids -> (B, T, d)
        m, c = self.model, self.model.config
        K = max(len(lzw.entries) for lzw in self.lzw) if c.hyper else 0
        table = self.table_in[:, :K] if c.hyper else m.transformer.wte.weight.new_zeros(idx.size(0), 0, c.n_embd)
        return kernels.hyper_embedding(idx, m.transformer.wte.weight, table, c.vocab_size) + m.transformer.wpe(pos)

    def _run(self, x, mask):
        m = self.model
        for block in m.transformer.h:
            x = block(x, mask, self.cache)
        self.h = m.transformer.ln_f(x[:, -1])                             # (B, d)

    def _prefill(self, keep):
        """(Re)compute keys and values for the last `keep` codes of every row."""
        c, device = self.model.config, self.model.device
        rows = [r[-keep:] for r in self.rows]
        B, L = len(rows), max(len(r) for r in rows)
        idx = torch.tensor([[0] * (L - len(r)) + r for r in rows], device=device)          # (B, L)
        valid = torch.tensor([[False] * (L - len(r)) + [True] * len(r) for r in rows], device=device)
        self.next_pos = valid.sum(1)                                      # (B,) next position id
        self.key_valid = torch.zeros(B, c.block_size, dtype=torch.bool, device=device)
        self.key_valid[:, :L] = valid
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # a pad query may attend to itself only, so that no row of the mask is empty
        mask = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)  # (B, L, L)
        self.cache = KVCache(c, B, device, self.model.transformer.wte.weight.dtype)
        x = self._embed(idx, (valid.cumsum(1) - 1).clamp(min=0))
        self._run(x, mask[:, None])

    @torch.no_grad()
    def logits(self):
        """Next-code logits (B, V [+ K + 1]), -inf outside each row's valid set."""
        m, c = self.model, self.model.config
        logits = m.lm_head(self.h)                                        # (B, V)
        if not c.hyper:
            return logits
        t0 = time.perf_counter()
        n = torch.tensor([len(lzw.entries) for lzw in self.lzw], device=m.device)
        K = int(n.max())
        hyper = masked_hyper_logits(self.h[:, None], self.table_out[:, :K], n[:, None],
                                    self.pending[:, None], self.has_pending[:, None])[:, 0]
        self.hyper_seconds += time.perf_counter() - t0
        return torch.cat([logits, hyper], dim=-1)                         # (B, V + K + 1)

    @torch.no_grad()
    def advance(self, codes):
        """Read one code per row; ValueError if a code is not valid for its row."""
        c, device = self.model.config, self.model.device
        new = []
        for b, (lzw, code) in enumerate(zip(self.lzw, codes)):
            _, installed = lzw.push(code, len(self.rows[b]))
            new += [(b, i - c.vocab_size, lzw.entries[i - c.vocab_size]) for i in installed]
            self.rows[b].append(code)
        self._update_hyper(new)
        if self.cache.pos == c.block_size:                                # context full: crop
            self._prefill(c.block_size // 2)
            return
        idx = torch.tensor(codes, device=device)[:, None]                 # (B, 1)
        self.key_valid[:, self.cache.pos] = True
        x = self._embed(idx, self.next_pos[:, None])
        self.next_pos = self.next_pos + 1
        self._run(x, self.key_valid[:, None, None, :self.cache.pos + 1])
