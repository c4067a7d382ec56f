"""
Starting a zip2zip model from trained weights: a plain checkpoint of ours or OpenAI's GPT-2
(Hugging Face's format), in full or with LoRA adapters. train.py's --init_from and --lora_rank.

Every base (plain GPT) weight must load; only the hypertoken parts (hyper-encoder, reconstruction
head) start new. With LoRA the base weights are frozen and checkpoints hold them with the adapters
folded in, so any script loads them as a plain zip2zip model; resuming unfolds them again.
"""

import math
from dataclasses import replace

import torch
import torch.nn as nn

from lib import cli
from zip2zip import GPT

HYPER_PARTS = ("hyper_in.", "hyper_out.", "recon")   # what a plain GPT does not have
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "bias", "tie_weights")  # what adapting takes from the source
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}   # (n_layer, n_head, n_embd)

# -----------------------------------------------------------------------------
# GPT-2's weights, and loading base weights into a zip2zip model


def gpt2_state_from_hf(hf):
    """Our state dict from a Hugging Face GPT-2 one (GPT2LMHeadModel or GPT2Model). The names are
    the same (nanoGPT copied them); HF's Conv1D stores weights as (in, out), nn.Linear as (out, in),
    so those four are transposed. The causal-mask buffers attn.bias/attn.masked_bias are skipped."""
    out = {}
    for k, v in hf.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        out[k] = v.t() if k.endswith(CONV1D) else v
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])  # tied; GPT2Model has no head
    return out


def gpt2_state_to_hf(state):
    """The inverse of gpt2_state_from_hf on the base weights (to check it, or to export)."""
    return {k: v.t() if k.endswith(CONV1D) else v for k, v in state.items() if not k.startswith(HYPER_PARTS)}


def load_base_weights(model, state):
    """Copy every base (plain GPT) weight of `state` into model; ValueError names any that is
    missing or does not fit. Hypertoken parts load too when `state` has them in the same shape,
    else they stay new. Returns the names of the parameters that did not come from `state`."""
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own, problems, new = model.state_dict(), [], []
    for k, dst in own.items():
        src = state.get(k)
        if k == "transformer.wpe.weight" and src is not None and src.size(0) >= dst.size(0):
            src = src[:dst.size(0)]     # a shorter context keeps the first positions
        if src is not None and src.shape == dst.shape:
            with torch.no_grad():
                dst.copy_(src)          # state_dict tensors share storage with the parameters
        elif k.startswith(HYPER_PARTS):
            new.append(k)
        else:
            problems.append(f"{k} ({'missing' if src is None else f'{tuple(src.shape)}, need {tuple(dst.shape)}'})")
    if problems:
        raise ValueError(f"base weights that do not load: {', '.join(problems)}")
    return new


def adapted_model(cfg, mconf):
    """(a zip2zip model on the CPU holding the weights of cfg.init_from, a GPT-2 size or a folder
    with a ckpt.pt; cfg with the source's architecture, a copy). The hyper-encoder is new."""
    if cfg.init_from in GPT2_SIZES:
        try:
            from transformers import GPT2LMHeadModel
            state = gpt2_state_from_hf(GPT2LMHeadModel.from_pretrained(cfg.init_from).state_dict())
        except ImportError:
            raise ValueError(f"--init_from={cfg.init_from} needs the optional package transformers") from None
        except OSError as e:
            raise ValueError(f"--init_from={cfg.init_from}: could not fetch the weights: {e}") from None
        arch = dict(zip(("n_layer", "n_head", "n_embd"), GPT2_SIZES[cfg.init_from]), bias=True, tie_weights=True)
        source_block = 1024
    else:
        src, _ = cli.load_checkpoint(cfg.init_from, "cpu")
        arch, state, source_block = {k: getattr(src.config, k) for k in ARCH_KEYS}, src.state_dict(), src.config.block_size
    if cfg.block_size > source_block:
        raise ValueError(f"--block_size={cfg.block_size} is longer than {cfg.init_from}'s {source_block}: "
                         f"its position table has no rows for the rest")
    for k, v in arch.items():
        if getattr(cfg, k) != v:
            print(f"{cfg.init_from} sets {k} = {v!r}")
    model = GPT(replace(mconf, **arch))   # (a hyper_n_embd of 0 derives the width from the source's n_embd)
    new = load_base_weights(model, state)
    print(f"loaded every base weight from {cfg.init_from}; new: {', '.join(sorted({k.split('.')[0] for k in new})) or 'nothing'}")
    return model, replace(cfg, **arch)

# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) x A^T B^T with W, b frozen. B starts at zero, so the model starts
    exactly as loaded. Keeps `weight` and `bias` under their names, so checkpoints stay nanoGPT's."""

    def __init__(self, base, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear (and peft) do
        self.scale = alpha / rank

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self):
        return self.weight + self.scale * self.lora_B @ self.lora_A


def add_lora(model, rank, alpha):
    """Adapters on the attention and MLP linears of the GPT blocks; only they, the hyper-encoder
    and the reconstruction head train. wte stays frozen: it is tied to the base output layer (39M
    of GPT-2 small's 124M), and the hyper-encoder learns to write into the space the model reads."""
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n or n.startswith(HYPER_PARTS)


def plain_state(model):
    """(the state dict with LoRA folded into the weights, which cli.load_checkpoint reads; what
    resume needs besides: the adapters and the unfolded weights, or None without LoRA)."""
    state, lora = model.state_dict(), {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for k in (".weight", ".lora_A", ".lora_B"):
                lora[name + k] = state.pop(name + k)
            state[name + ".weight"] = m.merged_weight().detach()
    return state, lora or None


def unfold_lora(model, lora, rank, alpha, where):
    """The inverse of plain_state on a resumed model: adapters back on, the base weights unmerged."""
    add_lora(model, rank, alpha)
    res = model.load_state_dict(lora or {}, strict=False)
    if res.unexpected_keys or any("lora_" in k for k in res.missing_keys):
        raise ValueError(f"{where}: the LoRA state does not fit --lora_rank={rank}")


def make_model(cfg, mconf, resumed=None):
    """(the model on the CPU, as --init_from says, with LoRA adapters when lora_rank > 0; the run's
    settings). resumed: (model, checkpoint) of a run being resumed. Adapting takes the source's
    architecture (the settings returned are a copy that holds it) and checks that every base weight
    loaded."""
    if cfg.init_from == "resume":
        model, ckpt = resumed
        if cfg.lora_rank:   # the checkpoint holds the weights with the adapters folded in
            unfold_lora(model, ckpt.get("lora"), cfg.lora_rank, cfg.lora_alpha, cfg.out_dir)
        return model, cfg
    model, cfg = (GPT(mconf), cfg) if cfg.init_from == "scratch" else adapted_model(cfg, mconf)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return model, cfg
