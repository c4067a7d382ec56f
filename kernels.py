"""
Fused kernels for the two embedding lookups of zip2zip.

A zip2zip sequence mixes base tokens (id < V) with hypertokens (id >= V), whose embeddings the
hyper-encoder computes per row from the base tokens they stand for. Two lookups sit on that path:

1. hyper_embedding: the input embedding of a compressed sequence. Each position reads exactly
   one row, from wte or from its row's table of hyper-embeddings, and its gradient goes back to
   that one row. (The published model looks every position up in both tables and adds the two
   under masks: twice the reads, and a (B, T, d) intermediate per table.)
2. gather_slots: the input of the hyper-encoder. Each hypertoken is a padded list of base ids;
   gather their embeddings, add the learned slot positions and zero the pads in one pass,
   instead of embedding + add + mask as three kernels with two (N, M, d) intermediates.

Each comes as a plain PyTorch reference (zip2zip.py's own lookup: the spec, and what runs on
CPU), a Triton kernel in a torch.autograd.Function, and a dispatch function; use_kernels(model)
makes a model call the dispatch functions (train.py and bench.py do on a GPU). The backward kernels sum into
the tables with fp32 atomic adds and cast at the end, so repeated ids accumulate in fp32 also
for bf16 tables (exact up to the order of the adds).
"""

import math

import torch

from zip2zip import HyperEncoder, embed_codes, embed_slots

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # no triton (e.g. macOS): the references run everywhere
    HAS_TRITON = False

# Which implementation the dispatch functions run: None picks Triton for CUDA tensors and the
# reference otherwise; "triton" or "reference" forces one. Tests set "triton" to run the kernels
# on CPU tensors in triton's interpreter. Subtle: the interpreter needs TRITON_INTERPRET=1 in the
# environment before this module is imported, because @triton.jit reads it when it decorates.
FORCE = None


def _use_triton(*tensors):
    if FORCE is not None:
        return FORCE == "triton"
    # Under torch.compile (the decoding step) the reference runs: inductor fuses it into a kernel
    # of its own, and the compiled graph stays whole.
    return HAS_TRITON and all(t.is_cuda for t in tensors) and not torch.compiler.is_compiling()


def _launch(rows, d):
    """How to launch a kernel over rows of d columns: (grid, d_units, constexprs).

    One program per (row, block of BLOCK_D columns); masking covers d that is not a power of 2.
    Subtle: triton vectorises a load or store (up to 16 bytes a thread) only where it can prove
    the address aligned and the mask `cols < D` constant across the vector, and both hang on
    what it knows of d; on its own it sees only whether d % 16 == 0. So the kernels take d as
    d_units * D_ALIGN, D_ALIGN the largest power of 2 up to 16 that divides d, and triton knows
    d is a multiple of D_ALIGN: with d=520, fp32 rows move in 16-byte vectors, not 4-byte words.
    Unlike a hint this cannot lie: a wrong D_ALIGN makes a wrong d, which every test sees.
    (Triton 3.9 drops tl.multiple_of on a scalar argument and learns nothing from tl.assume
    here. The columns need no hint: triton sees that a block starts at a multiple of BLOCK_D.)
    Example: d=520 -> D_ALIGN=8, d_units=65; d=768 -> 16, 48; d=33 -> 1, 33.
    """
    block_d = min(triton.next_power_of_2(d), 512)
    align = math.gcd(d, 16)
    return (rows, triton.cdiv(d, block_d)), d // align, dict(BLOCK_D=block_d, D_ALIGN=align)


# -----------------------------------------------------------------------------
# Triton kernels (defined only if triton imports)

if HAS_TRITON:

    @triton.jit
    def _hyper_row(tok, b, wte_ptr, hyper_ptr, K, V, D):
        # the one row an id reads (or, in the backward, writes): wte[tok] or hyper[b, tok - V]
        return tl.where(tok < V, wte_ptr + tok * D, hyper_ptr + (b * K + tok - V) * D)

    @triton.jit
    def _hyper_embedding_fwd(idx_ptr, wte_ptr, hyper_ptr, out_ptr, T, K, V, d_units,
                             BLOCK_D: tl.constexpr, D_ALIGN: tl.constexpr):
        D = d_units * D_ALIGN  # the row length (see _launch)
        pos = tl.program_id(0).to(tl.int64)  # flat (b, t); int64 so pos * D cannot overflow
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        src = _hyper_row(tl.load(idx_ptr + pos), pos // T, wte_ptr, hyper_ptr, K, V, D)
        tl.store(out_ptr + pos * D + cols, tl.load(src + cols, mask=mask), mask=mask)

    @triton.jit
    def _hyper_embedding_bwd(idx_ptr, dwte_ptr, dhyper_ptr, dout_ptr, T, K, V, d_units,
                             BLOCK_D: tl.constexpr, D_ALIGN: tl.constexpr):
        D = d_units * D_ALIGN
        pos = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        dst = _hyper_row(tl.load(idx_ptr + pos), pos // T, dwte_ptr, dhyper_ptr, K, V, D)
        g = tl.load(dout_ptr + pos * D + cols, mask=mask).to(tl.float32)
        # into fp32 buffers: repeated ids sum in fp32. Relaxed, because the adds only accumulate
        # (nothing reads the sums until the kernel ends): then the GPU fires and forgets them
        # (red, not atom), where the default acq_rel orders each add, with barriers around it.
        tl.atomic_add(dst + cols, g, mask=mask, sem="relaxed")

    @triton.jit
    def _gather_slots_fwd(contents_ptr, lengths_ptr, wte_ptr, pos_ptr, out_ptr, M, d_units,
                          BLOCK_D: tl.constexpr, D_ALIGN: tl.constexpr):
        D = d_units * D_ALIGN
        i = tl.program_id(0).to(tl.int64)  # flat (n, s)
        n, s = i // M, i % M
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        # a pad has no live columns: it reads nothing and stores 0. (One comparison, because triton
        # 3.9's interpreter mis-types `block & scalar` masks.)
        live = cols < tl.where(s < tl.load(lengths_ptr + n), D, 0)
        tok = tl.load(contents_ptr + i)
        # add in fp32 and round once, as torch does for bf16 (and the interpreter can't add bf16)
        x = tl.load(wte_ptr + tok * D + cols, mask=live, other=0.0).to(tl.float32)
        x += tl.load(pos_ptr + s * D + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + i * D + cols, x.to(out_ptr.dtype.element_ty), mask=cols < D)

    @triton.jit
    def _gather_slots_bwd(contents_ptr, lengths_ptr, dout_ptr, dwte_ptr, dpos_ptr, M, d_units,
                          BLOCK_D: tl.constexpr, D_ALIGN: tl.constexpr):
        D = d_units * D_ALIGN
        i = tl.program_id(0).to(tl.int64)
        n, s = i // M, i % M
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        live = cols < tl.where(s < tl.load(lengths_ptr + n), D, 0)  # pads pass no gradient on
        g = tl.load(dout_ptr + i * D + cols, mask=live).to(tl.float32)
        # relaxed: these adds only accumulate too (see _hyper_embedding_bwd)
        tl.atomic_add(dwte_ptr + tl.load(contents_ptr + i) * D + cols, g, mask=live, sem="relaxed")
        tl.atomic_add(dpos_ptr + s * D + cols, g, mask=live, sem="relaxed")


# -----------------------------------------------------------------------------
# 1. hyper_embedding: the input embedding of compressed ids

# the reference: zip2zip.embed_codes, the plain PyTorch lookup the model runs everywhere else
hyper_embedding_reference = embed_codes


class HyperEmbedding(torch.autograd.Function):

    @staticmethod
    def forward(ctx, idx, wte, hyper, vocab_size):
        idx, wte, hyper = idx.contiguous(), wte.contiguous(), hyper.contiguous()
        (B, T), (K, d) = idx.shape, hyper.shape[1:]
        out = wte.new_empty(B, T, d)
        grid, d_units, meta = _launch(B * T, d)
        if B * T:  # triton refuses an empty grid
            # with K == 0 hyper has no storage; pass wte, which is never read through it
            _hyper_embedding_fwd[grid](idx, wte, hyper if K else wte, out, T, K, vocab_size, d_units, **meta)
        ctx.save_for_backward(idx)
        ctx.vocab_size, ctx.dtype = vocab_size, wte.dtype
        ctx.wte_shape, ctx.hyper_shape = wte.shape, hyper.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        idx, = ctx.saved_tensors
        (B, T), (_, K, d) = idx.shape, ctx.hyper_shape
        dwte = torch.zeros(ctx.wte_shape, dtype=torch.float32, device=idx.device)
        dhyper = torch.zeros(ctx.hyper_shape, dtype=torch.float32, device=idx.device)
        grid, d_units, meta = _launch(B * T, d)
        if B * T:
            _hyper_embedding_bwd[grid](idx, dwte, dhyper if K else dwte, dout.contiguous(),
                                       T, K, ctx.vocab_size, d_units, **meta)
        return None, dwte.to(ctx.dtype), dhyper.to(ctx.dtype), None


def hyper_embedding(idx, wte, hyper, vocab_size):
    """Embed compressed ids (see hyper_embedding_reference); returns (B, T, d) in wte's dtype."""
    hyper = hyper.to(wte.dtype)  # the hyper-encoder may run in another precision (autocast)
    if _use_triton(idx, wte, hyper):
        return HyperEmbedding.apply(idx, wte, hyper, vocab_size)
    return hyper_embedding_reference(idx, wte, hyper, vocab_size)


# -----------------------------------------------------------------------------
# 2. gather_slots: the padded input of the hyper-encoder

# the reference: zip2zip.embed_slots
gather_slots_reference = embed_slots


class GatherSlots(torch.autograd.Function):

    @staticmethod
    def forward(ctx, contents, lengths, wte, slot_pos):
        contents, lengths = contents.contiguous(), lengths.contiguous()
        wte, slot_pos = wte.contiguous(), slot_pos.contiguous()
        (N, M), d = contents.shape, wte.size(1)
        out = wte.new_empty(N, M, d)
        grid, d_units, meta = _launch(N * M, d)
        if N * M:
            _gather_slots_fwd[grid](contents, lengths, wte, slot_pos, out, M, d_units, **meta)
        ctx.save_for_backward(contents, lengths)
        ctx.wte_shape, ctx.dtype = wte.shape, wte.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        contents, lengths = ctx.saved_tensors
        (N, M), d = contents.shape, ctx.wte_shape[1]
        dwte = torch.zeros(ctx.wte_shape, dtype=torch.float32, device=contents.device)
        dpos = torch.zeros(M, d, dtype=torch.float32, device=contents.device)
        grid, d_units, meta = _launch(N * M, d)
        if N * M:
            _gather_slots_bwd[grid](contents, lengths, dout.contiguous(), dwte, dpos, M, d_units, **meta)
        return None, None, dwte.to(ctx.dtype), dpos.to(ctx.dtype)


def gather_slots(contents, lengths, wte, slot_pos):
    """Gather the hyper-encoder's input (see gather_slots_reference); (N, M, d) in wte's dtype."""
    slot_pos = slot_pos.to(wte.dtype)
    if _use_triton(contents, wte, slot_pos):
        return GatherSlots.apply(contents, lengths, wte, slot_pos)
    return gather_slots_reference(contents, lengths, wte, slot_pos)


def use_kernels(model):
    """Make a zip2zip GPT look its embeddings up through the dispatch functions above: the Triton
    kernels on CUDA tensors, the references elsewhere. Returns the model."""
    model.embed_codes = hyper_embedding
    for module in model.modules():
        if isinstance(module, HyperEncoder):
            module.embed_slots = gather_slots
    return model
