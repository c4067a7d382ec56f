"""
Tests for kernels.py: each Triton kernel against its PyTorch reference, forward and backward,
and each reference against a naive per-element loop.

Without a GPU the kernels run on CPU tensors in triton's interpreter (TRITON_INTERPRET=1); with
one they are compiled and run on CUDA tensors.
"""

import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Subtle: @triton.jit reads TRITON_INTERPRET when it decorates, so it must be set before
    # kernels is imported, and kernels re-imported if another test module imported it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "kernels" in sys.modules:
        importlib.reload(sys.modules["kernels"])
import kernels  # noqa: E402

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton does not import")


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", "triton")


def grads(fn, inputs, dout):
    """Run fn on fresh copies of inputs; return its output and their gradients, given dout."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [x.grad for x in inputs]


# -----------------------------------------------------------------------------
# hyper_embedding

def make_idx(B, T, V, K, kind, gen):
    """Compressed ids (B, T): row b uses only its first few hypertokens (ragged tables)."""
    used = torch.randint(1, K + 1, (B, 1), generator=gen) if K else torch.zeros(B, 1, dtype=torch.long)
    u = torch.rand(B, T, generator=gen)
    if kind == "all_base":
        return (u * V).long()
    if kind == "all_hyper":
        return V + (u * used).long()
    if kind == "repeated":  # every position of a row reads the same id (base or hyper)
        return torch.where(torch.arange(B)[:, None] % 2 == 0, 3, V + used - 1).expand(B, T).clone()
    return (u * (V + used)).long()  # mixed


HYPER_CASES = [  # B, T, V, K, d, kind
    (1, 1, 5, 0, 48, "all_base"),      # single position, K=0: no hyper table at all
    (3, 9, 11, 0, 33, "all_base"),     # K=0, d not a power of 2
    (2, 7, 11, 3, 48, "mixed"),
    (3, 13, 17, 5, 768, "mixed"),      # d=768: two column blocks, the second masked
    (4, 6, 9, 4, 20, "all_base"),      # tables present but unused
    (3, 8, 9, 6, 40, "all_hyper"),
    (4, 16, 7, 3, 24, "repeated"),
]


@needs_triton
@pytest.mark.parametrize("B, T, V, K, d, kind", HYPER_CASES)
def test_hyper_embedding_matches_reference(B, T, V, K, d, kind, force_triton):
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + K)
    idx = make_idx(B, T, V, K, kind, gen).to(DEVICE)
    wte = torch.randn(V, d, generator=gen).to(DEVICE)
    hyper = torch.randn(B, K, d, generator=gen).to(DEVICE)
    dout = torch.randn(B, T, d, generator=gen).to(DEVICE)
    f = lambda w, h: kernels.hyper_embedding(idx, w, h, V)
    r = lambda w, h: kernels.hyper_embedding_reference(idx, w, h, V)
    out, (dwte, dhyper) = grads(f, [wte, hyper], dout)
    ref, (dwte_ref, dhyper_ref) = grads(r, [wte, hyper], dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # a gather is a copy: exact
    # the sums of repeated ids differ from the reference only in the order of fp32 adds
    torch.testing.assert_close(dwte, dwte_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dhyper, dhyper_ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_hyper_embedding_repeated_ids_accumulate(force_triton):
    # every position reads wte[2]: its gradient is the sum of all upstream gradients
    B, T, V, d = 3, 50, 4, 40
    idx = torch.full((B, T), 2, device=DEVICE)
    wte, hyper = torch.randn(V, d, device=DEVICE), torch.randn(B, 2, d, device=DEVICE)
    dout = torch.randn(B, T, d, device=DEVICE)
    _, (dwte, dhyper) = grads(lambda w, h: kernels.hyper_embedding(idx, w, h, V), [wte, hyper], dout)
    torch.testing.assert_close(dwte[2].double(), dout.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert dwte[[0, 1, 3]].eq(0).all() and dhyper.eq(0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyper_embedding_dtypes(dtype, force_triton):
    gen = torch.Generator().manual_seed(0)
    B, T, V, K, d = 2, 11, 13, 4, 72
    idx = make_idx(B, T, V, K, "mixed", gen).to(DEVICE)
    wte = torch.randn(V, d, generator=gen).to(DEVICE, dtype)
    hyper = torch.randn(B, K, d, generator=gen).to(DEVICE, dtype)
    dout = torch.randn(B, T, d, generator=gen).to(DEVICE, dtype)
    out, (dwte, dhyper) = grads(lambda w, h: kernels.hyper_embedding(idx, w, h, V), [wte, hyper], dout)
    assert out.dtype == dwte.dtype == dhyper.dtype == dtype
    torch.testing.assert_close(out, kernels.hyper_embedding_reference(idx, wte, hyper, V), rtol=0, atol=0)
    # gradients are summed in fp32 and rounded once: compare with an fp32 reference, rounded
    r = lambda w, h: kernels.hyper_embedding_reference(idx, w, h, V)
    _, (dwte_ref, dhyper_ref) = grads(r, [wte.float(), hyper.float()], dout.float())
    torch.testing.assert_close(dwte, dwte_ref.to(dtype))
    torch.testing.assert_close(dhyper, dhyper_ref.to(dtype))


def test_hyper_embedding_reference_is_naive_loop():
    gen = torch.Generator().manual_seed(1)
    B, T, V, K, d = 2, 5, 4, 3, 3
    idx = torch.tensor([[0, 4, 3, 4, 6], [5, 1, 1, 4, 2]])  # repeated base and hyper ids
    wte, hyper = torch.randn(V, d, generator=gen), torch.randn(B, K, d, generator=gen)
    dout = torch.randn(B, T, d, generator=gen)
    f = lambda w, h: kernels.hyper_embedding_reference(idx, w, h, V)
    out, (dwte, dhyper) = grads(f, [wte, hyper], dout)
    want, dwte_want, dhyper_want = torch.zeros(B, T, d), torch.zeros(V, d), torch.zeros(B, K, d)
    for b in range(B):
        for t in range(T):
            i = idx[b, t].item()
            if i < V:
                want[b, t] = wte[i]
                dwte_want[i] += dout[b, t]
            else:
                want[b, t] = hyper[b, i - V]
                dhyper_want[b, i - V] += dout[b, t]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(dwte, dwte_want)
    torch.testing.assert_close(dhyper, dhyper_want)


# -----------------------------------------------------------------------------
# gather_slots

SLOT_CASES = [  # N, M, V, d
    (0, 4, 9, 48),    # no hypertokens in the batch
    (1, 1, 5, 48),    # one entry of one slot
    (5, 3, 11, 33),
    (7, 4, 6, 768),   # few base ids: many repeats in the wte gradient
    (9, 5, 20, 40),
]


@needs_triton
@pytest.mark.parametrize("N, M, V, d", SLOT_CASES)
def test_gather_slots_matches_reference(N, M, V, d, force_triton):
    gen = torch.Generator().manual_seed(N * 100 + M)
    contents = torch.randint(0, V, (N, M), generator=gen).to(DEVICE)
    lengths = torch.randint(1, M + 1, (N,), generator=gen).to(DEVICE)
    if N:
        lengths[0] = M  # at least one full entry
    wte = torch.randn(V, d, generator=gen).to(DEVICE)
    slot_pos = torch.randn(M, d, generator=gen).to(DEVICE)
    dout = torch.randn(N, M, d, generator=gen).to(DEVICE)
    f = lambda w, p: kernels.gather_slots(contents, lengths, w, p)
    out, (dwte, dpos) = grads(f, [wte, slot_pos], dout)
    r = lambda w, p: kernels.gather_slots_reference(contents, lengths, w, p)
    ref, (dwte_ref, dpos_ref) = grads(r, [wte, slot_pos], dout)
    assert out.shape == (N, M, d)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dwte, dwte_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpos, dpos_ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_slots_pads_and_dtypes(dtype, force_triton):
    gen = torch.Generator().manual_seed(2)
    N, M, V, d = 6, 4, 10, 56
    lengths = torch.tensor([1, 4, 2, 3, 1, 4], device=DEVICE)
    live = torch.arange(M, device=DEVICE) < lengths[:, None]
    # pads hold id V-1, whose row is nan: a kernel that reads or scatters pads fails
    contents = torch.randint(0, V - 1, (N, M), generator=gen).to(DEVICE).masked_fill(~live, V - 1)
    wte = torch.randn(V, d, generator=gen).to(DEVICE, dtype)
    wte[V - 1] = float("nan")
    slot_pos = torch.randn(M, d, generator=gen).to(DEVICE, dtype)
    dout = torch.randn(N, M, d, generator=gen).to(DEVICE, dtype)
    f = lambda w, p: kernels.gather_slots(contents, lengths, w, p)
    out, (dwte, dpos) = grads(f, [wte, slot_pos], dout)
    assert out.dtype == dtype and out[~live].eq(0).all()
    # fp32 is exact; bf16 within an ulp, because triton's interpreter truncates fp32 -> bf16
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, kernels.gather_slots_reference(contents, lengths, wte, slot_pos), **tol)
    r = lambda w, p: kernels.gather_slots_reference(contents, lengths, w, p)
    _, (dwte_ref, dpos_ref) = grads(r, [wte.float(), slot_pos.float()], dout.float())
    torch.testing.assert_close(dwte, dwte_ref.to(dtype))
    assert dwte[V - 1].eq(0).all()
    torch.testing.assert_close(dpos, dpos_ref.to(dtype))


def test_gather_slots_reference_is_naive_loop():
    gen = torch.Generator().manual_seed(3)
    V, M, d = 6, 3, 2
    contents = torch.tensor([[5, 2, 5], [1, 0, 0], [2, 2, 4]])  # pads hold 0 or any valid id
    lengths = torch.tensor([3, 1, 2])
    wte, slot_pos = torch.randn(V, d, generator=gen), torch.randn(M, d, generator=gen)
    dout = torch.randn(3, M, d, generator=gen)
    f = lambda w, p: kernels.gather_slots_reference(contents, lengths, w, p)
    out, (dwte, dpos) = grads(f, [wte, slot_pos], dout)
    want, dwte_want, dpos_want = torch.zeros(3, M, d), torch.zeros(V, d), torch.zeros(M, d)
    for n in range(3):
        for s in range(lengths[n]):  # pads stay 0 and get no gradient
            want[n, s] = wte[contents[n, s]] + slot_pos[s]
            dwte_want[contents[n, s]] += dout[n, s]
            dpos_want[s] += dout[n, s]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(dwte, dwte_want)
    torch.testing.assert_close(dpos, dpos_want)


# -----------------------------------------------------------------------------
# dispatch

@pytest.mark.parametrize("force, want", [(None, False), ("reference", False), ("triton", True)])
def test_dispatch(force, want, monkeypatch):
    if want and not kernels.HAS_TRITON:
        pytest.skip("triton does not import")
    if want and DEVICE == "cuda":
        pytest.skip("triton runs CPU tensors only in its interpreter, which is off on a GPU machine")
    monkeypatch.setattr(kernels, "FORCE", force)
    wte = torch.randn(5, 8, requires_grad=True)  # CPU tensors: the reference unless forced
    out = kernels.hyper_embedding(torch.tensor([[0, 5]]), wte, torch.randn(1, 1, 8), 5)
    assert (type(out.grad_fn).__name__ == "HyperEmbeddingBackward") == want
    out = kernels.gather_slots(torch.tensor([[1, 2]]), torch.tensor([1]), wte, torch.randn(2, 8))
    assert (type(out.grad_fn).__name__ == "GatherSlotsBackward") == want


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatch_picks_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", None)
    wte = torch.randn(5, 8, device="cuda", requires_grad=True)
    hyper = torch.randn(1, 1, 8, device="cuda")
    out = kernels.hyper_embedding(torch.tensor([[0, 5]], device="cuda"), wte, hyper, 5)
    assert type(out.grad_fn).__name__ == "HyperEmbeddingBackward"
