"""
What every data/<name>/prepare.py shares: split documents by a stable hash, tokenize them with
GPT-2's BPE (r50k_base), join them with <|endoftext|> and write train.bin / val.bin / meta.json.

The .bin format is nanoGPT's: raw np.uint16 token ids, no header, read back with
np.memmap(path, dtype=np.uint16, mode="r"). Each document is preceded by one EOT (50256), so
every document starts right after a wall and the first token of a file is always EOT:

    [EOT, doc0..., EOT, doc1..., EOT, doc2...]

Bits per byte needs the UTF-8 byte count of any token span. Nothing extra is stored for it:
token_byte_lengths(enc)[ids].sum() gives it back (EOT counts 0 bytes, it is not text), and
write_splits checks that this sum equals the byte count of the text it encoded.
"""

import hashlib
import json
import os
import platform
import time

import numpy as np

TOKENIZER = "r50k_base"  # the same ranks as "gpt2", shipped in data/r50k_base.tiktoken: no download
DTYPE = np.uint16        # 50257 ids fit in 16 bits; half the disk and memory of int32

# -----------------------------------------------------------------------------
# the split

def is_val(key, val_fraction):
    """
    True if the document named `key` belongs to the validation split.
    The decision hangs on the key alone (not on its position in a list), so adding or removing
    other documents never moves this one. Python's hash() is salted per process, so use sha256.
    Example: is_val("json/decoder.py", 0.1) is the same on every machine, run and Python version.
    """
    return _unit_hash(key) < val_fraction

def _unit_hash(key):
    # first 8 bytes of sha256(key) as a number in [0, 1)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64

def split_keys(keys, val_fraction=0.1):
    """
    Sort the keys and split them into (train_keys, val_keys) by is_val.
    Subtle: with few keys the hash may pick none for val; then the key with the smallest hash
    goes to val, still a choice that does not depend on the order of `keys`.
    """
    keys = sorted(keys)
    if len(keys) < 2:
        raise ValueError(f"{len(keys)} documents: a train and a val split need at least two")
    val = [k for k in keys if is_val(k, val_fraction)]
    if not val:
        val = [min(keys, key=_unit_hash)]
    val_set = set(val)
    train = [k for k in keys if k not in val_set]
    if not train:
        raise ValueError("every document landed in val; lower val_fraction")
    return train, val

# -----------------------------------------------------------------------------
# tokens and bytes

RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def gpt2_bpe(path=None):
    """GPT-2's BPE as a tiktoken Encoding (r50k_base), built from the ranks file shipped in this
    repository (OpenAI's, MIT licensed: data/r50k_base.LICENSE), so that nothing is ever
    downloaded. Same ids as tiktoken.get_encoding("r50k_base"). OSError with the path if the file
    is missing or damaged."""
    import base64

    import tiktoken
    from tiktoken_ext import openai_public
    path = path or RANKS
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OSError(f"GPT-2's BPE ranks (r50k_base) are missing: {e}; they ship with the repository "
                      f"as data/r50k_base.tiktoken (restore it with git checkout)") from None
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise OSError(f"{path} is damaged (its sha256 is not r50k_base's): restore it with git checkout")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    # the split pattern as tiktoken writes it (older versions inline it in their gpt2 definition)
    pattern = getattr(openai_public, "r50k_pat_str",
                      r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    return tiktoken.Encoding("r50k_base", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def get_encoding():
    return gpt2_bpe()

def token_byte_lengths(enc):
    """
    lengths[i] = number of UTF-8 bytes token i stands for; EOT counts 0 (it is a wall, not text).
    Then the bytes of a span of base tokens are lengths[ids].sum(), e.g. for bits per byte.
    Example (r50k_base): "hello" -> [31373], lengths[31373] == 5.
    """
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i != enc.eot_token:
            lengths[i] = len(enc.decode_single_token_bytes(i))
    return lengths

def encode_documents(enc, texts, num_threads=8, log_every=250, label=""):
    """
    Encode each text with encode_ordinary (special-token strings such as "<|endoftext|>" inside a
    document stay plain text) and return one uint16 array: one EOT before each document.
    """
    parts = []
    n_tokens = 0
    for start in range(0, len(texts), log_every):
        batch = texts[start:start + log_every]
        # tiktoken releases the GIL while encoding, so threads do run in parallel
        for ids in enc.encode_ordinary_batch(batch, num_threads=num_threads):
            ids = np.array([enc.eot_token] + ids, dtype=np.int64)
            assert ids.max() < 2**16, "token id does not fit uint16"
            parts.append(ids.astype(DTYPE))
            n_tokens += len(ids)
        print(f"{label}: encoded {min(start + log_every, len(texts))}/{len(texts)} documents, "
              f"{n_tokens:,} tokens so far")
    if not parts:
        return np.zeros(0, dtype=DTYPE)
    return np.concatenate(parts)

# -----------------------------------------------------------------------------
# writing

def _write_atomic(path, write):
    # write to a temporary name, then rename: a run killed halfway never leaves a truncated
    # train.bin behind that a later run would take for finished data
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)

def write_splits(out_dir, splits, source, extra=None, num_threads=8):
    """
    splits: {"train": [text, ...], "val": [text, ...]}, documents already in their final order.
    Writes out_dir/{train,val}.bin and out_dir/meta.json (last, so its presence means the .bin
    files are complete) and returns the meta dict.
    """
    enc = get_encoding()
    assert enc.n_vocab <= 2**16
    lengths = token_byte_lengths(enc)
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "tokenizer": TOKENIZER,
        "vocab_size": enc.n_vocab,    # 50257
        "eot_token": enc.eot_token,   # 50256, one before each document
        "dtype": np.dtype(DTYPE).name,
        "source": source,
        "python_version": platform.python_version(),
    }
    meta.update(extra or {})
    for name, texts in splits.items():
        t0 = time.time()
        ids = encode_documents(enc, texts, num_threads=num_threads, label=name)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        # the promise of this format: the text's bytes can be recomputed from its tokens
        assert int(lengths[ids].sum()) == n_bytes, "token bytes do not add up to the text bytes"
        _write_atomic(os.path.join(out_dir, f"{name}.bin"), ids.tofile)
        meta[name] = {"documents": len(texts), "tokens": len(ids), "bytes": n_bytes}
        print(f"{name}: {len(texts):,} documents, {len(ids):,} tokens, {n_bytes:,} bytes "
              f"({n_bytes / max(len(ids) - len(texts), 1):.2f} bytes/token) in {time.time() - t0:.1f}s")
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    _write_atomic(os.path.join(out_dir, "meta.json"), dump)
    return meta
