"""CUDA autocast's float32 policy, emulated on the CPU, so that a dtype rule only CUDA enforces
fails here too.

Under autocast, CUDA runs the ops of its float32 list (log, exp, softmax, layer_norm, sum, ...:
ATen's AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE, "CUDA Ops that can autocast to float32"
in torch's docs) in float32, whatever their inputs; CPU autocast has no such list, so
`bf16.log()` stays bf16 on the CPU and becomes fp32 on a GPU. Inside `cuda_autocast()` (CPU
autocast, bf16 by default) those ops get their low-precision float inputs cast to fp32 first, as
CUDA's autocast does, and every fp32 tensor at least as wide as the base vocabulary, with more
than one row, is recorded: a full-precision copy of the logits, which a bf16 model must never make.

    with cuda_autocast(vocab_size=V) as seen:
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and seen.fp32_copies == []
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

T = torch.Tensor
# every spelling a model can use: torch.x, Tensor.x, F.x (the ones this project may reach)
FP32_OPS = {
    torch.log, T.log, torch.log2, T.log2, torch.log10, T.log10, torch.log1p, T.log1p,
    torch.exp, T.exp, torch.expm1, T.expm1, torch.reciprocal, T.reciprocal, torch.rsqrt, T.rsqrt,
    torch.pow, T.pow, T.__pow__, T.__rpow__, T.__rtruediv__, torch.acos, T.acos, torch.asin, T.asin,
    torch.cosh, T.cosh, torch.sinh, T.sinh, torch.tan, T.tan, torch.erfinv, T.erfinv,
    torch.softmax, T.softmax, F.softmax, torch.log_softmax, T.log_softmax, F.log_softmax,
    torch.logsumexp, T.logsumexp, F.softplus,
    torch.sum, T.sum, torch.cumsum, T.cumsum, torch.prod, T.prod, torch.cumprod, T.cumprod,
    torch.norm, T.norm, torch.linalg.vector_norm, F.normalize, torch.cdist, F.cosine_similarity,
    F.layer_norm, torch.layer_norm, F.group_norm, F.rms_norm,
    F.nll_loss, F.cross_entropy, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.kl_div,
    F.binary_cross_entropy_with_logits,
}
LOW = (torch.bfloat16, torch.float16)


class _Fp32Policy(TorchFunctionMode):
    """Casts the low-precision float inputs of FP32_OPS to fp32 while CPU autocast is on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FP32_OPS and torch.is_autocast_enabled("cpu") and kwargs.get("dtype") is None:
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in LOW else a
            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


class Fp32Copies(TorchDispatchMode):
    """Records (op, shape) of every new fp32 tensor of more than one row as wide as `width` or wider."""

    def __init__(self, width):
        super().__init__()
        self.width, self.fp32_copies = width, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2 \
                        and t.size(-1) >= self.width and t.numel() > t.size(-1):
                    self.fp32_copies.append((str(func), tuple(t.shape)))
        return out


@contextmanager
def cuda_autocast(vocab_size, dtype=torch.bfloat16, autocast=True):
    """CPU autocast in `dtype` with CUDA's float32 policy; yields the recorder (.fp32_copies).
    autocast=False: the policy and the recorder only, for code that enters autocast itself."""
    seen = Fp32Copies(vocab_size)
    with (torch.autocast("cpu", dtype=dtype) if autocast else nullcontext()), _Fp32Policy(), seen:
        yield seen

