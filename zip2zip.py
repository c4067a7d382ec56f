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

Layout: the LZW codec, the tokenizer and its reports, then the model.
"""

import codecs
import math
import os
import sys
from dataclasses import dataclass, field

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
        code, length, n = self.code, self.length, len(self.entries)
        for t in ids:
            if t in D:                          # a wall: flush the match, emit t, merge nothing
                if code >= 0:
                    emit(code)
                emit(t)
                code, length = -1, 0
                continue
            if code < 0:                        # a single base id always matches
                code, length = t, 1
            else:
                key = code * V + t
                nxt = edges.get(key)
                if nxt is not None:             # the match extends
                    code, length = nxt, length + 1
                else:                           # it does not: new entry (if room), emit match
                    if n < C:
                        edges[key] = V + n
                        entries.append(((code,) if code < V else entries[code - V]) + (t,))
                        n += 1
                    emit(code)
                    code, length = t, 1
            if length == M:                     # longest allowed: emit now, make no entry
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
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


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
    lzw, ids = LZW(vocab_size, max_codebook_size, max_subtokens, disabled_ids), []
    for i, code in enumerate(_as_list(codes)):
        ids.extend(lzw.push(code, i)[0])
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


class Tokenizer:
    """GPT-2 BPE, then LZW. `<|endoftext|>` is a disabled id: nothing merges across documents.

    no_digit_merges=True also disables every base token that contains a digit, so numbers are
    always spelled in plain BPE tokens (the paper's math results degrade most under merging).
    """

    def __init__(self, max_subtokens=4, max_codebook_size=1024, no_digit_merges=False,
                 encoding="r50k_base"):
        import tiktoken  # imported here so that the codec above needs nothing but the stdlib
        self.bpe = tiktoken.get_encoding(encoding)
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

    def show(self, codes, color=True):
        """The text with its hypertokens marked: alternating ANSI colours, or [brackets]."""
        parts, k = [], 0
        for code, text in self.segments(codes):
            if code < self.vocab_size:
                parts.append(text)
            elif color:
                parts.append(f"\x1b[{(41, 44)[k % 2]};97m{text}\x1b[0m")
                k += 1
            else:
                parts.append(f"[{text}]")
        return "".join(parts)


def compression_stats(tokenizer, ids, window=1024):
    """Bytes, base tokens and codes for base ids cut into windows of `window` base tokens,
    each compressed with a fresh codebook (window=0: one codebook for everything)."""
    ids = _as_list(ids)
    step = window or max(len(ids), 1)
    n_codes = sum(len(lzw_encode(ids[i:i + step], tokenizer.vocab_size, tokenizer.max_codebook_size,
                                 tokenizer.max_subtokens, tokenizer.disabled_ids))
                  for i in range(0, len(ids), step))
    return {"bytes": tokenizer.n_bytes(ids), "base_tokens": len(ids), "codes": n_codes}


def efficiency_report(paths, max_subtokens=4, max_codebook_size=1024, window=1024,
                      no_digit_merges=False, show=False, color=None):
    """Token efficiency per file and in total. A `.bin` file is read as uint16 base ids."""
    tok = Tokenizer(max_subtokens, max_codebook_size, no_digit_merges)
    color = sys.stdout.isatty() if color is None else color
    print(f"M={max_subtokens} C={max_codebook_size} window={window or 'whole file'} base tokens")
    print(f"{'file':<40} {'bytes':>12} {'base':>11} {'codes':>11} {'B/base':>7} {'B/code':>7} {'ratio':>6}")
    total = {"bytes": 0, "base_tokens": 0, "codes": 0}
    rows = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path!r} is not a file")
        if path.endswith(".bin"):
            ids = np.fromfile(path, dtype=np.uint16).tolist()
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                ids = tok.bpe.encode_ordinary(f.read())
        rows.append((path, compression_stats(tok, ids, window)))
        if show:
            print(tok.show(lzw_encode(ids[:window or None], tok.vocab_size, max_codebook_size,
                                      max_subtokens, tok.disabled_ids), color))
    for name, s in rows + [("total", None)]:
        if s is None:
            s = total
        else:
            total = {k: total[k] + s[k] for k in total}
        b, n, c = s["bytes"], max(s["base_tokens"], 1), max(s["codes"], 1)
        print(f"{name[-40:]:<40} {b:>12,} {s['base_tokens']:>11,} {s['codes']:>11,} "
              f"{b / n:>7.2f} {b / c:>7.2f} {c / n:>6.3f}")
    return total

# -----------------------------------------------------------------------------
# Configuration: dataclass defaults, then preset files, then --key=value overrides


def _coerce(value, default, where):
    """`value` (a literal, or a command-line string) as the type of `default`, or ValueError."""
    import ast
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        if kind is bool and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
    if kind is float and type(value) is int:
        value = float(value)
    if default is not None and type(value) is not kind:
        raise ValueError(f"{where}: expected {kind.__name__} (like the default {default!r}), "
                         f"got {value!r}")
    return value


def configure(config, args, presets=True):
    """Apply preset files and `--key=value` overrides to a dataclass instance, in order.

    A preset (`config/name.py`) is a file of `key = literal` lines: parsed, never executed.
    Unknown keys and values of the wrong type raise ValueError naming them. Returns the
    remaining positional arguments.
    """
    import ast
    import dataclasses
    known = {f.name for f in dataclasses.fields(config)}

    def set_value(key, value, where):
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        setattr(config, key, _coerce(value, getattr(config, key), where))

    positional = []
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"{arg}: expected --key=value")
            set_value(key, value, arg)
        elif presets and arg.endswith(".py"):
            if not os.path.isfile(arg):
                raise ValueError(f"preset {arg!r} not found")
            for node in ast.parse(open(arg).read(), arg).body:
                where = f"{arg}:{node.lineno}"
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    raise ValueError(f"{where}: a preset holds only `key = literal` lines")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise ValueError(f"{where}: the value of {node.targets[0].id} is not a literal") from None
                set_value(node.targets[0].id, value, where)
        else:
            positional.append(arg)
    return positional


# -----------------------------------------------------------------------------
# Command line: the token-efficiency report


@dataclass
class ReportConfig:
    max_subtokens: int = 4          # M: the paper's default merge size (M=3..5 are close)
    max_codebook_size: int = 1024   # C: enough entries for a 1024-token window of code
    window: int = 1024              # base tokens per fresh codebook, like a training window; 0: whole file
    no_digit_merges: bool = False   # keep digits out of hypertokens
    show: bool = False              # print each file's first window with hypertokens marked


if __name__ == "__main__":
    cfg = ReportConfig()
    try:
        files = configure(cfg, sys.argv[1:], presets=False)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if not files:
        raise SystemExit("usage: python zip2zip.py FILE... [--max_subtokens=4] [--max_codebook_size=1024] "
                         "[--window=1024] [--no_digit_merges=False] [--show=False]\n"
                         "FILE is a text file or a .bin file of uint16 GPT-2 ids (data/pycode/val.bin)")
    efficiency_report(files, cfg.max_subtokens, cfg.max_codebook_size, cfg.window,
                      cfg.no_digit_merges, cfg.show)
