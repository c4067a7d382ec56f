"""
Tests for kernels.py: each Triton kernel against its PyTorch reference, forward and backward,
and each reference against a naive per-element loop.

Without a GPU the kernels run on CPU tensors in triton's interpreter (TRITON_INTERPRET=1); with
one they are compiled and run on CUDA tensors. Either way, the test_aot_* tests compile every
kernel ahead of time for A100 and H100 (sm_80, sm_90) and check the PTX: no GPU is needed for that.
"""

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import warnings

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


@needs_triton
def test_a_model_with_the_kernels_swapped_in_computes_the_same(force_triton):
    # use_kernels makes forward call the dispatch functions (train.py does on a GPU): the same
    # logits, loss and gradients as zip2zip.py's plain lookups
    from tests.test_model import codes_of, tiny
    model = tiny(dropout=0.0, n_embd=16, hyper_n_embd=8)
    rows = [codes_of(s, model, 20) for s in range(2)]
    idx, tgt = torch.tensor([r[:-1] for r in rows]), torch.tensor([r[1:] for r in rows])
    results = []
    for swap in (False, True):
        if swap:
            kernels.use_kernels(model)
        model.zero_grad()
        logits, loss = model.train()(idx, tgt)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert model.embed_codes is kernels.hyper_embedding and model.hyper_in.embed_slots is kernels.gather_slots
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# launch arguments

@needs_triton
def test_launch_factors_d():
    # the worked examples of kernels._launch, then every d up to 100
    assert kernels._launch(3, 520) == ((3, 2), 65, dict(BLOCK_D=512, D_ALIGN=8))
    assert kernels._launch(3, 768) == ((3, 2), 48, dict(BLOCK_D=512, D_ALIGN=16))
    assert kernels._launch(3, 33) == ((3, 1), 33, dict(BLOCK_D=64, D_ALIGN=1))
    for d in range(1, 101):
        (_, blocks), d_units, meta = kernels._launch(5, d)
        align, block_d = meta["D_ALIGN"], meta["BLOCK_D"]
        assert d_units * align == d and align in (1, 2, 4, 8, 16)
        assert align == 16 or d_units % 2 == 1  # the largest such power of 2: no factor 2 is left
        assert (blocks - 1) * block_d < d <= blocks * block_d


# -----------------------------------------------------------------------------
# ahead of time: every kernel compiled for real GPUs, without one
#
# Triton's wheel carries ptxas, so triton.compile builds a kernel for any NVIDIA target on a CPU.
# The PTX shows what the interpreter cannot: how the backward kernels add into memory, and how
# many bytes each thread moves per load or store. Every kernel is compiled once, for each target,
# dtype and shape below (144 small kernels, about 8 s on 2 cores), and the tests read the PTX.

CAPS = [80, 90]                              # A100, H100 (compute capability 8.0, 9.0)
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}   # the model's dtypes: bytes per element
KERNEL_NAMES = ["_hyper_embedding_fwd", "_hyper_embedding_bwd", "_gather_slots_fwd", "_gather_slots_bwd"]
SHAPES = [  # d, and n: the value of every size that may be 1 (T, K, M)
    (768, 64),                          # GPT-2's d: d % 16 == 0, which triton sees by itself
    (520, 64), (516, 64), (514, 64), (513, 64),  # d % 16 = 8, 4, 2, 1: only _launch tells triton
    (16, 1),   # decoding: T=1, and K=M=d_units=1, become constants in triton's JIT; tiny blocks
]


def launch_args(name, dtype, d, n):
    """The arguments kernels.py launches kernel `name` with: a pointer's type, or an int."""
    _, d_units, meta = kernels._launch(n, d)
    t, f32, i64, V = "*" + dtype, "*fp32", "*i64", 50257  # V: GPT-2's vocabulary
    args = {
        "_hyper_embedding_fwd": dict(idx_ptr=i64, wte_ptr=t, hyper_ptr=t, out_ptr=t, T=n, K=n, V=V),
        "_hyper_embedding_bwd": dict(idx_ptr=i64, dwte_ptr=f32, dhyper_ptr=f32, dout_ptr=t, T=n, K=n, V=V),
        "_gather_slots_fwd": dict(contents_ptr=i64, lengths_ptr=i64, wte_ptr=t, pos_ptr=t, out_ptr=t, M=n),
        "_gather_slots_bwd": dict(contents_ptr=i64, lengths_ptr=i64, dout_ptr=t, dwte_ptr=f32, dpos_ptr=f32, M=n),
    }[name]
    return dict(args, d_units=d_units, **meta)


def jit_specialization(fn, args):
    """The signature, constexprs and attrs that triton 3.9's JIT builds when it launches fn with
    args (JITFunction._pack_args): a torch tensor is 16-byte aligned, an int equal to 1 becomes a
    constant, an int divisible by 16 is marked so. Compiling with them is compiling what runs."""
    assert [p.name for p in fn.params] == list(args), "launch_args is out of date"
    div16 = [["tt.divisibility", 16]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(fn.params, args.values())):
        if p.is_constexpr or v == 1:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, str):  # a pointer
            signature[p.name], attrs[(i,)] = v, div16
        else:
            signature[p.name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = div16
    return signature, constexprs, attrs


def compile_all(path):
    """Compile every kernel for every target, dtype and shape; write {key: PTX} as JSON to path.

    Run in a process where TRITON_INTERPRET is off (see the fixture ptx)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    # triton 3.9 warns that its fp-fusion default changes in 3.10; these kernels have no a*b+c
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    out = {}
    for name, cap, dtype, (d, n) in itertools.product(KERNEL_NAMES, CAPS, DTYPES, SHAPES):
        fn = getattr(kernels, name)
        signature, constexprs, attrs = jit_specialization(fn, launch_args(name, dtype, d, n))
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        out[f"{name} {cap} {dtype} {d}"] = triton.compile(src, target=GPUTarget("cuda", cap, 32)).asm["ptx"]
    with open(path, "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """{(kernel name, cap, dtype, d): PTX} for every kernel, target, dtype and shape."""
    if not kernels.HAS_TRITON:
        pytest.skip("triton does not import")
    import triton
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no CUDA backend, so it cannot compile for NVIDIA GPUs")
    # Subtle: TRITON_INTERPRET=1 (set above for the CPU tests) made every @triton.jit in this
    # process an interpreter object, triton's own library included, and those cannot be
    # compiled. So compile in a fresh process with TRITON_INTERPRET=0, which the setdefault at
    # the top of this file keeps: there kernels.py, and triton, decorate as on a GPU machine.
    tmp = tmp_path_factory.mktemp("aot")
    paths = [os.path.dirname(kernels.__file__), os.path.dirname(__file__), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "cache"),  # not ~/.triton
               PYTHONPATH=os.pathsep.join(filter(None, paths)))
    code = "import sys, test_kernels; test_kernels.compile_all(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(tmp / "ptx.json")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp / "ptx.json") as f:
        return {tuple(int(x) if x.isdigit() else x for x in key.split()): v for key, v in json.load(f).items()}


def global_accesses(ptx):
    """(opcode, bytes a thread moves) of each masked global load, store and atomic in ptx.

    Example: '@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ];' -> ('ld.global.v4.b32', 16).
    The loads of one id per program (ld.global.b64, not masked) are left out.
    """
    out = []
    for op in re.findall(r"^\s*@!?%p\d+\s+((?:ld|st|red|atom)\.global\.\S+)", ptx, re.MULTILINE):
        parts = op.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        out.append((op, vec * int(parts[-1][1:]) // 8))  # .v4.b32: 4 x 32 bits
    return out


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["_hyper_embedding_bwd", "_gather_slots_bwd"])
def test_aot_backward_adds_are_relaxed_reductions(name, cap, dtype, ptx):
    for d, _ in SHAPES:
        code = ptx[name, cap, dtype, d]
        adds = [op for op, _ in global_accesses(code) if op.startswith(("red", "atom"))]
        # a relaxed add whose result is unused compiles to red (fire and forget), not atom. The
        # default sem="acq_rel" gives atom.global.gpu.acq_rel.add, with a bar.sync on each side.
        assert adds and all(op.startswith("red.global.gpu.relaxed.add.") for op in adds), f"d={d}: {adds}"
        assert not re.search(r"acq_rel|acquire|release|fence|membar", code), f"d={d}"
        # sm_90 adds in vectors and has no barrier. sm_80 has only scalar float reds: where the
        # gradient is loaded in vectors, triton deals it out one float per thread through shared
        # memory, behind one bar.sync (a cost on A100, not an ordering of the adds).
        assert code.count("bar.sync") <= (0 if cap >= 90 else 1), f"d={d}"


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_aot_accesses_are_as_wide_as_d_allows(name, cap, dtype, ptx):
    # Each thread moves min(a, e, 16 bytes) per instruction: a the largest power of 2 (up to 16)
    # dividing d, which _launch tells triton, and e the elements a thread holds, BLOCK_D columns
    # over triton's default 4 warps of 32 threads. Narrower would waste instructions; wider
    # would be a lie about alignment (a misaligned-address fault, or a mask cut wrong, on a GPU).
    size = DTYPES[dtype]
    for d, _ in SHAPES:
        align = min(d & -d, 16)                                    # d=520 -> 8
        per_thread = max(1, min(1 << (d - 1).bit_length(), 512) // (4 * 32))
        elems = min(align, per_thread)
        for op, nbytes in global_accesses(ptx[name, cap, dtype, d]):
            if op.startswith(("red", "atom")):  # into fp32 buffers; sm_80 has no vector float adds
                want = 4 * (min(elems, 4) if cap >= 90 else 1)
            else:
                want = size * min(elems, 16 // size)
            assert nbytes == want, f"d={d}: {op} moves {nbytes} bytes a thread, want {want}"


def test_dispatch_inside_torch_compile_runs_the_reference(monkeypatch):
    # a compiled graph (the decoding step) gets the reference, which inductor fuses itself
    monkeypatch.setattr(kernels, "FORCE", None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not kernels._use_triton(torch.zeros(1, device=DEVICE))
