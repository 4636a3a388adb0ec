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

from dataclasses import asdict, dataclass

import torch
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
        return ACT2FN[self.hidden_act](gate) * up

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
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
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
        return activation(self.gate_proj(x), self.up_proj(x))


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
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if e < 0 or e >= len(self):
                continue
            token_idx, top_k_pos = torch.where(top_k_index == e)
            expert = self[e]
            y = expert.down_proj(expert.intermediate(hidden_states[token_idx], self.activation))
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
