"""The LZW codec: worked examples, the naive reference (tests/naive_lzw.py, quoted in DESIGN.md 1),
round-trips and fault tolerance."""
import inspect
import os
import random
import re
import textwrap

import pytest

from lib.loader import lzw_encode_window
from naive_lzw import NaiveLZW, naive_lzw_decode, naive_lzw_encode
from zip2zip import LZW, lzw_decode, lzw_encode


def naive_encode(ids, V, C, M, D=()):
    """The naive encoder's codes and codebook {id: content}."""
    lzw, out = NaiveLZW(V, C, M, D), []
    for t in ids:
        lzw.step(t, out)
    out += [lzw.code(lzw.buf)] if lzw.buf else []
    return out, {v: k for k, v in lzw.codebook.items()}


def codebook_of(lzw):
    return {lzw.V + i: e for i, e in enumerate(lzw.entries)}


def encoded_state(ids, V, C, M, D=()):
    lzw, out = LZW(V, C, M, D), []
    lzw.feed(ids, out)
    lzw.flush(out)
    return out, lzw


# DESIGN.md section 1, worked by hand (V=100, C=64, M=4 unless stated)
WORKED = [
    ([1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 5, 1, 2], 64, (), [1, 2, 3, 100, 102, 101, 4, 103, 4, 5, 100]),
    ([7, 7, 7, 7, 7, 7, 7, 7], 64, (), [7, 100, 101, 100]),
    ([1, 2, 9, 1, 2, 1, 2, 9, 1, 2], 64, (9,), [1, 2, 9, 100, 100, 9, 100]),
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 2, (), [1, 2, 3, 100, 3, 100, 3]),
    ([1, 2, 1, 2, 1], 64, (), [1, 2, 100, 1]),  # the module docstring's example
]


@pytest.mark.parametrize("ids,C,D,codes", WORKED)
def test_worked_examples(ids, C, D, codes):
    assert lzw_encode(ids, 100, C, 4, D) == naive_lzw_encode(ids, 100, C, 4, D) == codes
    assert lzw_decode(codes, 100, C, 4, D) == naive_lzw_decode(codes, 100, C, 4, D) == ids


def test_design_md_quotes_the_naive_reference():
    # DESIGN.md 1 and 1.1 show the plain codec as Python: it is tests/naive_lzw.py, word for word
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "DESIGN.md")) as f:
        quoted = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    for method in (NaiveLZW.step, NaiveLZW.resolve):
        assert textwrap.dedent(inspect.getsource(method)) in quoted, method.__name__


def test_worked_codebook():
    _, lzw = encoded_state([1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 5, 1, 2], 100, 64, 4)
    assert codebook_of(lzw) == {
        100: (1, 2), 101: (2, 3), 102: (3, 1), 103: (1, 2, 3), 104: (3, 1, 2), 105: (2, 3, 4),
        106: (4, 1), 107: (1, 2, 3, 4), 108: (4, 5), 109: (5, 1)}


def test_kwkwk_pending():
    # After reading 7 the decoder knows no entry; the next code 100 is the pending id [7,7].
    lzw = LZW(100, 64, 4)
    assert lzw.push(7) == (7,) and len(lzw.entries) == 0
    assert lzw.pending() == (7, 7)
    assert lzw.push(100) == (7, 7) and lzw.entries == [(7, 7)]    # reading 100 installed it
    assert lzw.pending() == (7, 7, 7)                   # the match is (7,7) now


def random_stream(rng, V, n, repeats=True):
    if repeats and rng.random() < 0.5:                  # repeated motifs make long hypertokens
        motifs = [[rng.randrange(V) for _ in range(rng.randint(1, 4))] for _ in range(3)]
        out = []
        while len(out) < n:
            out += rng.choice(motifs) if rng.random() < 0.8 else [rng.randrange(V)]
        return out[:n]
    return [rng.randrange(V) for _ in range(n)]


def random_params(rng):
    V = rng.randint(1, 6)
    D = tuple(rng.sample(range(V), rng.randint(0, min(2, V - 1))))
    return V, rng.choice([0, 1, 2, 5, 30, 1000]), rng.randint(1, 5), D


@pytest.mark.parametrize("seed", range(8))
def test_matches_naive_reference(seed):
    rng = random.Random(seed)
    for _ in range(300):
        V, C, M, D = random_params(rng)
        ids = random_stream(rng, V, rng.randint(0, 80))
        expected, expected_book = naive_encode(ids, V, C, M, D)
        codes, lzw = encoded_state(ids, V, C, M, D)
        assert codes == expected, (ids, V, C, M, D)
        assert codebook_of(lzw) == expected_book
        assert lzw_decode(codes, V, C, M, D) == naive_lzw_decode(codes, V, C, M, D) == ids
        # a stream that is not canonical (every hypertoken spelled out) decodes the same way too
        assert naive_lzw_decode(ids, V, C, M, D) == lzw_decode(ids, V, C, M, D) == ids
    with pytest.raises(ValueError):
        naive_lzw_decode([1, 102], 100, 64, 4)            # 100 is the only possible new id


def test_codebook_full_and_kwkwk_runs_happen():
    # The random tests must really visit the corner cases: count them.
    rng, full, kwkwk = random.Random(0), 0, 0
    for _ in range(500):
        V, C, M, D = random_params(rng)
        ids = random_stream(rng, V, 60)
        codes, lzw = encoded_state(ids, V, C, M, D)
        full += 0 < C == len(lzw.entries)
        dec = LZW(V, C, M, D)
        for c in codes:
            kwkwk += c == V + len(dec.entries)
            dec.push(c)
    assert full > 20 and kwkwk > 20


def test_max_subtokens_one_is_identity():
    rng = random.Random(1)
    ids = random_stream(rng, 5, 200)
    codes, lzw = encoded_state(ids, 5, 100, 1)
    assert codes == ids and len(lzw.entries) == 0


@pytest.mark.parametrize("seed", range(4))
def test_expanded_hypertokens_decode(seed):
    """Spell some hypertokens out in base tokens: the same text comes back, and the decoder's
    codebook is the encoder's (DESIGN.md 1.1)."""
    rng = random.Random(seed)
    for _ in range(200):
        V, C, M, D = random_params(rng)
        ids = random_stream(rng, V, rng.randint(1, 80))
        codes, lzw = encoded_state(ids, V, C, M, D)
        noisy = []
        for c in codes:
            noisy += list(lzw.content(c)) if c >= V and rng.random() < 0.4 else [c]
        dec = LZW(V, C, M, D)
        assert [t for i, c in enumerate(noisy) for t in dec.push(c, i)] == ids
        assert dec.entries == lzw.entries


@pytest.mark.parametrize("seed", range(4))
def test_random_valid_streams_decode(seed):
    """Any stream of valid codes (what a model may generate) decodes, and the codebook after
    decoding equals the encoder's codebook over the decoded text."""
    rng = random.Random(seed)
    for _ in range(200):
        V, C, M, D = random_params(rng)
        dec, stream, ids = LZW(V, C, M, D), [], []
        for _ in range(rng.randint(1, 60)):
            valid = list(range(V + len(dec.entries))) + ([V + len(dec.entries)] if dec.pending() else [])
            code = rng.choice(valid[V:]) if valid[V:] and rng.random() < 0.5 else rng.choice(valid)
            stream.append(code)
            ids += dec.push(code)
        assert lzw_decode(stream, V, C, M, D) == ids
        assert dec.entries == encoded_state(ids, V, C, M, D)[1].entries


@pytest.mark.parametrize("codes,bad", [([1, 101], 101), ([1, 2, 103], 103), ([-1], -1), ([100], 100)])
def test_invalid_codes_raise(codes, bad):
    with pytest.raises(ValueError, match=f"invalid code {bad} at position {len(codes) - 1}"):
        lzw_decode(codes, 100, 64, 4)


def test_pending_rules():
    # Pending needs room in the codebook and a match shorter than M.
    with pytest.raises(ValueError):
        lzw_decode([7, 100], 100, 0, 4)             # C=0: no entries, no pending
    with pytest.raises(ValueError):
        lzw_decode([7, 9, 100], 100, 64, 4, (9,))   # after a wall there is no match
    assert lzw_decode([7, 100], 100, 64, 4) == [7, 7, 7]
    # [7,7] is installed by 7,7; then the match (7) extended by 7 is already an entry: no pending
    assert lzw_decode([7, 7], 100, 64, 4) == [7, 7]
    with pytest.raises(ValueError):
        lzw_decode([7, 7, 101], 100, 64, 4)


def test_encoder_rejects_ids_outside_base_vocabulary():
    with pytest.raises(ValueError, match="base id 100 at position 2"):
        lzw_encode([1, 2, 100], 100, 64, 4)
    with pytest.raises(ValueError, match="base id -3 at position 0"):
        lzw_encode([-3], 100, 64, 4)
    with pytest.raises(ValueError, match="max_subtokens"):
        lzw_encode([1], 100, 64, 0)


@pytest.mark.parametrize("seed", range(3))
def test_windows_cover_the_stream(seed):
    rng = random.Random(seed)
    V, C, M, D = 6, 20, 4, (5,)
    ids = random_stream(rng, V, 500)
    start, n = 0, 0
    while start < len(ids):
        codes, used = lzw_encode_window(ids, start, 37, V, C, M, D)
        # the first codes of the canonical encoding of what is left, covering exactly `used` ids
        assert codes == lzw_encode(ids[start:], V, C, M, D)[:37]
        assert lzw_decode(codes, V, C, M, D) == ids[start:start + used]
        start, n = start + used, n + 1
    assert start == len(ids) and n > 3


@pytest.mark.parametrize("bad,message", [
    ([1.0, 2.5], "must be integers, got 1.0 \\(float\\) at position 0"),
    ([1, 2, True], "must be integers, got True \\(bool\\) at position 2"),
    (None, "must be a sequence of integers, got NoneType"),
    ([[1, 2], [3, 4]], "must be integers, got \\[1, 2\\] \\(list\\)"),
    ("12", "must be integers, got '1' \\(str\\)"),
])
def test_ids_are_integers(bad, message):
    # a float id would otherwise pass through the decoder unnoticed (lzw_decode([1.0, 2.5]) once
    # returned [1.0, 2.5]); say what is wrong instead
    for f in (lzw_encode, lzw_decode):
        with pytest.raises(TypeError, match=message):
            f(bad, 100, 64, 4)
    import numpy as np
    with pytest.raises(TypeError, match="one-dimensional, got an array of 2 dimensions"):
        lzw_decode(np.zeros((2, 2), dtype=np.int64), 100, 64, 4)
    assert lzw_encode(np.array([1, 2, 1, 2, 1]), 100, 64, 4) == lzw_encode([1, 2, 1, 2, 1], 100, 64, 4) \
        == lzw_encode([np.int64(1), 2, 1, 2, 1], 100, 64, 4) == [1, 2, 100, 1]     # numpy ints are ints


def test_integer_arrays_are_checked_without_a_walk(monkeypatch, tmp_path):
    # the training loader encodes windows of a uint16 memmap: their dtype says they are integers,
    # and numpy checks their range, so the per-element type walk (as_ids) is not needed
    import numpy as np

    from lib import checks
    ids = [1, 2, 1, 2, 1, 9, 3, 3, 3]
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    data = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")
    expected = lzw_encode(ids, 10, 64, 4, (9,))
    monkeypatch.setattr(checks, "as_ids", lambda *a: pytest.fail("an integer array was walked"))
    assert lzw_encode(data, 10, 64, 4, (9,)) == lzw_encode(np.array(ids), 10, 64, 4, (9,)) == expected
    assert lzw_encode_window(data, 0, 100, 10, 64, 4, (9,)) == (expected, len(ids))
    assert all(type(c) is int for c in lzw_encode(data, 10, 64, 4, (9,)))     # Python ints come out
    with pytest.raises(ValueError, match="base id 9 at position 5 is outside the base vocabulary 0..8"):
        lzw_encode_window(data, 3, 100, 9, 64, 4)
