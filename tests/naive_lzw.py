"""The LZW of DESIGN.md 1 and 1.1, line by line, with tuples as codebook keys: slow and obviously
right. zip2zip.LZW is the same codec, fast (a trie with integer keys, the match carried as its
id); tests/test_lzw.py holds the two equal, and bench.py times them side by side. DESIGN.md 1
quotes NaiveLZW.step and NaiveLZW.resolve (a test checks that the quote is this code)."""


class NaiveLZW:
    """An encoder state: the codebook {tuple of base ids: hypertoken id} and `buf`, the match."""

    def __init__(self, V, C, M, D=()):
        self.V, self.C, self.M, self.D = V, C, M, set(D)
        self.codebook, self.entries, self.buf = {}, [], ()

    def code(self, buf):
        return buf[0] if len(buf) == 1 else self.codebook[buf]

    def step(self, t, out):
        """Encode one base id t, appending what it emits to out."""
        buf = self.buf
        if t in self.D:                              # a wall: nothing merges across it
            if buf:
                out.append(self.code(buf))
            out.append(t)
            buf = ()
        elif len(buf) == 0 or buf + (t,) in self.codebook:   # one base id always matches
            buf = buf + (t,)
        else:
            if len(self.entries) < self.C:           # a new hypertoken, while there is room
                self.codebook[buf + (t,)] = self.V + len(self.entries)
                self.entries.append(buf + (t,))
            out.append(self.code(buf))
            buf = (t,)
        if len(buf) == self.M:                       # the longest allowed: emit, make no entry
            out.append(self.code(buf))
            buf = ()
        self.buf = buf

    def resolve(self, c):
        """The base ids of the next code a decoder reads (DESIGN.md 1.1)."""
        n, buf = len(self.entries), self.buf
        if 0 <= c < self.V:
            return (c,)
        if c < self.V + n:
            return self.entries[c - self.V]
        if c == self.V + n and buf and len(buf) < self.M and n < self.C and buf + (buf[0],) not in self.codebook:
            return buf + (buf[0],)                   # the pending id (KwKwK)
        raise ValueError(f"invalid code {c}")


def naive_lzw_encode(ids, V, C, M, D=()):
    lzw, out = NaiveLZW(V, C, M, D), []
    for t in ids:
        lzw.step(t, out)
    if lzw.buf:
        out.append(lzw.code(lzw.buf))
    return out


def naive_lzw_decode(codes, V, C, M, D=()):
    """The decoder is the encoder, fed with what it decodes."""
    lzw, ids, unused = NaiveLZW(V, C, M, D), [], []
    for c in codes:
        content = lzw.resolve(c)
        ids.extend(content)
        for t in content:
            lzw.step(t, unused)
    return ids
