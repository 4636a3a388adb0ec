"""Replacement expert modules with the stock experts' forward contract.

Stock transformers 5.x experts are fused 3-D parameters (one width for every expert). Compression results that the
fused layout cannot hold — per-expert widths (HEAPr, CAMERA-P), packed low-bit or ternary weights (PMQ, MoTE) — live
in an `ExpertList`: an `nn.ModuleList` of `ExpertMLP`s, each with `gate_proj`, `up_proj`, `down_proj` Linear-like
modules. Being a ModuleList placed at `mlp.experts`, its state-dict names are exactly the legacy per-expert names
(`mlp.experts.{e}.gate_proj.weight`), and it is called as `experts(hidden [T,H], top_k_index [T,k],
top_k_weights [T,k])`, so the stock MoE blocks run unchanged.

A Linear-like module is `nn.Linear` or anything with `in_features`, `out_features`, `forward(x)` and
`dense_weight()` (e.g. quant.linear.PackedLinear). Swapping `gate_proj` for a packed module is all that
quantization needs to do; widths, routing and checkpoints stay the same.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class ExpertActivation:
    """a = act(x·gateᵀ) ⊙ (x·upᵀ), or GPT-OSS's clamped SwiGLU a = (up+1)·gate·σ(α·gate)."""

    kind: str = "glu"  # glu | gpt_oss
    hidden_act: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "gpt_oss":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return _act(self.hidden_act)(gate) * up

    def to_dict(self) -> dict:
        return asdict(self)


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear-like module (dequantized for packed ones)."""
    if isinstance(linear, nn.Linear):
        return linear.weight
    return linear.dense_weight()


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (no copy of the init, no re-initialisation)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(1, 1, bias=bias is not None, device="meta")  # shapes set below; skips weight init
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format),
                                 requires_grad=weight.requires_grad)  # contiguous: as a reloaded checkpoint has it
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return linear


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x), up(x))). Width = gate_proj.out_features (may be 0)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    @property
    def width(self) -> int:
        return self.gate_proj.out_features

    def intermediate(self, x: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
        return activation(_apply(self.gate_proj, x), _apply(self.up_proj, x))

    def run(self, x: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
        """down(act(gate(x), up(x))) — the expert's output for its routed tokens x."""
        return _apply(self.down_proj, self.intermediate(x, activation))


def _apply(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x). A plain nn.Linear with no hooks and no patched forward (accelerate offload patches it) skips the
    Module call machinery: same kernel, same result, less per-expert overhead."""
    if (type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks
            and "forward" not in linear.__dict__ and not _global_hooks()):
        return F.linear(x, linear.weight, linear.bias)
    return linear(x)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks)


@functools.lru_cache(maxsize=None)
def _act(name: str):
    """The activation module for `name` (ACT2FN builds a new instance on every lookup)."""
    return ACT2FN[name]


class ExpertList(nn.ModuleList):
    """Per-expert modules behind the stock experts call signature."""

    def __init__(self, experts: list[ExpertMLP], activation: ExpertActivation):
        super().__init__(experts)
        self.activation = activation

    @property
    def num_experts(self) -> int:
        return len(self)

    def widths(self) -> list[int]:
        return [expert.width for expert in self]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # Sort the (token, slot) pairs by expert once (stable: tokens ascending within an expert, as torch.where
        # gives them), gather the inputs once, run each hit expert on its contiguous slice, and scatter-add all
        # outputs in one index_add_ whose serial order (expert ascending per token) is the per-expert loop's: the
        # result is bitwise that of looping experts with torch.where, without E passes over top_k_index.
        out = torch.zeros_like(hidden_states)
        n_experts = len(self)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        valid = (flat >= 0) & (flat < n_experts)
        order = torch.argsort(torch.where(valid, flat, n_experts), stable=True)
        counts = torch.bincount(flat[valid], minlength=n_experts).tolist()
        order = order[: sum(counts)]
        token_idx = order // k
        weights = top_k_weights.reshape(-1)[order]
        x = hidden_states[token_idx]
        ys, start = [], 0
        experts = list(self._modules.values())
        for e, n in enumerate(counts):
            if n:
                ys.append(experts[e].run(x[start:start + n], self.activation))
                start += n
        if not ys:
            return out
        y = (torch.cat(ys) if len(ys) > 1 else ys[0]) * weights[:, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
        return out
