"""Apply compression decisions to a live model: keep experts, keep channels, merge experts, change top-k.

Every operation updates every place the expert count lives (experts module, router rows and biases, router and
block counters, PhiMoE's `out_features`, the config key, the ForCausalLM's cached `num_experts`) and fails fast —
before touching anything — when the result could not route:

* top-k must not exceed the experts left in any layer;
* group-limited routers (DeepSeek-V2 `group_limited_greedy`, DeepSeek-V3) reshape the E' kept experts into
  `n_group` contiguous groups. **Rule:** the kept set must take the same number c of experts from every original
  group (c ≥ 2 for V3, whose group score is the sum of the group's top-2; c ≥ 1 for V2), kept experts stay in
  ascending original order so each original group stays contiguous, and top_k ≤ topk_group · c. Under this rule
  group selection and expert selection are exactly those of the original router restricted to the kept set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moecompress.compress.experts import ExpertList, ExpertMLP, make_linear
from moecompress.compress.families import stock_experts_class, uses_groups
from moecompress.compress.moe import MoELayer, moe_layer, moe_layers
from moecompress.compress.routers import MappedRouter, MaskedRouter
from moecompress.errors import UserError


# ----- validation ---------------------------------------------------------------------------------------------
def check_routable(layer: MoELayer, keep: Sequence[int], top_k: int | None = None) -> list[int]:
    """Validate a kept-expert list for one layer; return it sorted. Raises UserError saying what breaks."""
    top_k = layer.top_k if top_k is None else top_k
    keep = sorted(int(e) for e in keep)
    n = layer.num_experts
    if len(set(keep)) != len(keep) or any(e < 0 or e >= n for e in keep):
        raise UserError(f"layer {layer.layer_idx}: kept experts must be distinct indices in [0, {n}), got {keep}")
    if top_k > len(keep):
        raise UserError(
            f"layer {layer.layer_idx}: top_k={top_k} exceeds the {len(keep)} experts kept; keep at least {top_k} "
            f"experts (lower --ratio) or lower top-k"
        )
    if uses_groups(layer.spec, layer.config):
        n_group = layer.config.n_group or 1
        per_group = n // n_group
        counts = [sum(1 for e in keep if e // per_group == g) for g in range(n_group)]
        need = 2 if layer.spec.routing == "deepseek_v3" else 1
        topk_group = layer.config.topk_group or 1
        if len(set(counts)) != 1 or counts[0] < need or top_k > topk_group * counts[0]:
            raise UserError(
                f"layer {layer.layer_idx}: group-limited routing (n_group={n_group}) needs the same number of kept "
                f"experts in every group, at least {need} per group and top_k ≤ topk_group·per_group; got "
                f"{counts} per group; choose a kept count divisible by {n_group} (methods prune equally per group)"
            )
    return keep


# ----- bookkeeping --------------------------------------------------------------------------------------------
def _set_count(layer: MoELayer, n: int) -> None:
    """The block's and the fused experts' counters (routers keep their own: see slice_router)."""
    if hasattr(layer.block, "num_experts"):
        layer.block.num_experts = n
    if not isinstance(layer.experts, ExpertList):
        layer.experts.num_experts = n


def sync_config(model: nn.Module) -> None:
    """Write the per-layer facts back to the config when they are uniform (the max otherwise; manifest has all)."""
    layers = moe_layers(model)
    spec = layers[0].spec
    count = max(layer.num_experts for layer in layers)
    setattr(model.config, spec.count_key, count)
    if hasattr(model, "num_experts"):
        model.num_experts = count
    widths = {w for layer in layers for w in layer.widths()}
    if len(widths) == 1:
        setattr(model.config, spec.width_key, widths.pop())
    top_ks = {layer.top_k for layer in layers}
    model.config.num_experts_per_tok = max(top_ks)
    if hasattr(model, "num_experts_per_tok"):
        model.num_experts_per_tok = model.config.num_experts_per_tok
    if spec.shared == "qwen2":
        shared = {layer.shared_mlp.gate_proj.out_features for layer in layers}
        if len(shared) == 1:
            model.config.shared_expert_intermediate_size = shared.pop()


# ----- keep experts -------------------------------------------------------------------------------------------
def keep_experts(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """Keep, per MoE layer index, the listed original experts (layers not listed are untouched).

    Returns the kept lists actually applied (sorted). Validates every layer before changing any.
    """
    layers = {layer.layer_idx: layer for layer in moe_layers(model)}
    unknown = set(keep) - set(layers)
    if unknown:
        raise UserError(f"layers {sorted(unknown)} are not MoE layers; MoE layers are {sorted(layers)}")
    plan = {i: check_routable(layers[i], kept) for i, kept in keep.items()}
    with torch.no_grad():
        for i, kept in plan.items():
            _slice_layer(layers[i], kept)
    sync_config(model)
    return plan


def slice_router(router: nn.Module, kept: list[int]) -> nn.Module:
    """Keep the router rows (and bias / score-correction bias) of the `kept` experts, in that order."""
    idx = torch.tensor(kept, dtype=torch.long)
    router.weight = nn.Parameter(router.weight.data[idx].clone(), requires_grad=router.weight.requires_grad)
    if getattr(router, "bias", None) is not None:
        router.bias = nn.Parameter(router.bias.data[idx].clone(), requires_grad=router.bias.requires_grad)
    if getattr(router, "e_score_correction_bias", None) is not None:
        router.e_score_correction_bias = router.e_score_correction_bias[idx].clone()
    router.num_experts = len(kept)
    if isinstance(router, nn.Linear):  # PhiMoE's router subclasses nn.Linear
        router.out_features = len(kept)
    return router


def _slice_experts(layer: MoELayer, kept: list[int]) -> None:
    """Keep the `kept` experts of the experts module (fused tensors sliced, or ExpertList entries picked)."""
    experts = layer.experts
    if isinstance(experts, ExpertList):
        layer.block.experts = ExpertList([experts[e] for e in kept], experts.activation)
    else:
        idx = torch.tensor(kept, dtype=torch.long)
        for name, param in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(param.data[idx].clone(), requires_grad=param.requires_grad))
    _set_count(layer, len(kept))


def _slice_layer(layer: MoELayer, kept: list[int]) -> None:
    slice_router(layer.router, kept)
    _slice_experts(layer, kept)


def mask_experts(model: nn.Module, keep: Mapping[int, Sequence[int]], mode: str) -> dict[int, list[int]]:
    """Keep the listed experts but route with the full original router (`MaskedRouter`, mode `masked` or
    `no_reroute`); the experts module holds only the kept experts. Group-limited routers need no equal-per-group
    rule here: pruned experts are excluded before group selection."""
    layers = {layer.layer_idx: layer for layer in moe_layers(model)}
    plan = {}
    for i, kept in keep.items():
        kept = sorted(int(e) for e in kept)
        if mode == "masked" and layers[i].top_k > len(kept):
            raise UserError(f"layer {i}: top_k={layers[i].top_k} exceeds the {len(kept)} experts kept")
        if layers[i].spec.routing == "sparsemixer" and mode == "masked":
            raise UserError("Phi-MoE's sparsemixer cannot be masked; use physical slicing (deploy=physical)")
        plan[i] = kept
    with torch.no_grad():
        for i, kept in plan.items():
            layer = layers[i]
            router = MaskedRouter(layer.router, kept, mode, layer.spec.routing, layer.norm_topk_prob)
            _slice_experts(layer, kept)
            setattr(layer.block, layer.spec.router_attr, router)
    sync_config(model)
    return plan


# ----- top-k --------------------------------------------------------------------------------------------------
def set_top_k(model: nn.Module, top_k: int, layer_indices: Sequence[int] | None = None) -> None:
    """Route each token to `top_k` experts in the given MoE layers (all by default)."""
    layers = [l for l in moe_layers(model) if layer_indices is None or l.layer_idx in set(layer_indices)]
    if top_k < 1:
        raise UserError(f"top_k must be ≥ 1, got {top_k}")
    if layers and layers[0].spec.routing == "sparsemixer" and top_k != 2:
        raise UserError("Phi-MoE's sparsemixer router always selects 2 experts; its top-k cannot be changed")
    for layer in layers:
        check_routable(layer, range(layer.num_experts), top_k)
    for layer in layers:
        layer.router.top_k = top_k
        if hasattr(layer.block, "top_k"):
            layer.block.top_k = top_k
    sync_config(model)


def set_renormalize(model: nn.Module, layer_indices: Sequence[int] | None = None) -> None:
    """Renormalise the selected top-k weights to sum to 1 (`norm_topk_prob=True`) in the given MoE layers (all
    by default; the config flag is model-wide)."""
    layers = [l for l in moe_layers(model) if layer_indices is None or l.layer_idx in set(layer_indices)]
    if not layers:
        return
    if layers[0].spec.renormalize != "flag":
        if layers[0].spec.renormalize == "always":
            return
        raise UserError(f"{layers[0].spec.name} has no norm_topk_prob switch; renormalisation cannot be turned on")
    model.config.norm_topk_prob = True
    for layer in layers:
        layer.router.norm_topk_prob = True


# ----- keep channels ------------------------------------------------------------------------------------------
def to_expert_list(layer: MoELayer) -> ExpertList:
    """Replace a fused experts module by an equivalent ExpertList (same outputs, per-expert nn.Linear)."""
    if isinstance(layer.experts, ExpertList):
        return layer.experts
    experts = []
    for e in range(layer.num_experts):
        w = layer.expert_weights(e)
        experts.append(ExpertMLP(make_linear(w.gate, w.gate_bias), make_linear(w.up, w.up_bias),
                                 make_linear(w.down, w.down_bias)))
    module = ExpertList(experts, layer.activation)
    layer.block.experts = module
    return module


def _slice_mlp(mlp: nn.Module, channels: torch.Tensor) -> None:
    """Keep intermediate channels of an MLP with gate_proj/up_proj/down_proj nn.Linear (biases follow)."""
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        setattr(mlp, name, make_linear(lin.weight[channels], None if lin.bias is None else lin.bias[channels]))
    down = mlp.down_proj
    mlp.down_proj = make_linear(down.weight[:, channels], down.bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def keep_channels(
    model: nn.Module,
    channels: Mapping[int, Mapping[int, Sequence[int]]],
    shared: Mapping[int, Sequence[int]] | None = None,
) -> None:
    """Keep, per MoE layer and expert, the listed intermediate channels (experts not listed keep all).

    `shared[layer]` lists the shared expert's kept channels. An expert may keep zero channels: it stays routable
    and contributes nothing (GPT-OSS: its down bias only), which is the paper semantics; the router is unchanged.
    If every routed expert of every layer ends with one width the experts are fused back into the stock module.
    """
    layers = {layer.layer_idx: layer for layer in moe_layers(model)}
    for i, per_expert in channels.items():
        widths = layers[i].widths()
        for e, kept in per_expert.items():
            if any(c < 0 or c >= widths[e] for c in kept) or len(set(kept)) != len(kept):
                raise UserError(f"layer {i} expert {e}: channels must be distinct indices in [0, {widths[e]})")
    with torch.no_grad():
        for i, per_expert in channels.items():
            module = to_expert_list(layers[i])
            for e, kept in per_expert.items():
                _slice_mlp(module[e], torch.tensor(sorted(kept), dtype=torch.long))
        for i, kept in (shared or {}).items():
            mlp = layers[i].shared_mlp
            if mlp is None:
                raise UserError(f"layer {i} has no shared expert")
            _slice_mlp(mlp, torch.tensor(sorted(kept), dtype=torch.long))
    fuse_if_uniform(model)
    sync_config(model)


def fuse_if_uniform(model: nn.Module) -> bool:
    """Turn ExpertLists back into the stock fused module when every expert in every layer has one width and
    plain nn.Linear weights. Returns whether the model's experts are now all stock."""
    layers = moe_layers(model)
    lists = [l for l in layers if isinstance(l.experts, ExpertList)]
    if not lists:
        return True
    widths = {w for l in layers for w in l.widths()}
    if len(widths) != 1 or not all(_plain(l.experts) for l in lists):
        return False
    for layer in lists:
        fuse_layer(model, layer.layer_idx)
    return True


def _plain(experts: ExpertList) -> bool:
    return all(isinstance(m, nn.Linear) for m in experts.modules() if m is not experts and not isinstance(m, ExpertMLP))


def fuse_layer(model: nn.Module, layer_idx: int) -> None:
    """Replace decoder layer `layer_idx`'s ExpertList (one width, plain nn.Linear experts) by the stock fused
    experts module holding the same tensors; the config's count and width keys are set to that layer's."""
    layer = moe_layer(model, layer_idx)
    widths = set(layer.widths())
    if not isinstance(layer.experts, ExpertList) or len(widths) != 1 or not _plain(layer.experts):
        raise UserError(f"layer {layer_idx}: only experts of one width with plain weights can be fused")
    spec = layer.spec
    with torch.no_grad():
        setattr(model.config, spec.width_key, widths.pop())
        setattr(model.config, spec.count_key, layer.num_experts)
        ws = [layer.expert_weights(e) for e in range(layer.num_experts)]
        device = ws[0].down.device
        with torch.device("meta"):
            fused = stock_experts_class(layer.block)(model.config)
        if spec.layout == "gpt_oss":
            gate_up = torch.stack([torch.stack([w.gate.T, w.up.T], dim=-1).reshape(w.gate.shape[1], -1) for w in ws])
            fused.gate_up_proj = nn.Parameter(gate_up)
            fused.gate_up_proj_bias = nn.Parameter(torch.stack(
                [torch.stack([w.gate_bias, w.up_bias], dim=-1).reshape(-1) for w in ws]))
            fused.down_proj = nn.Parameter(torch.stack([w.down.T for w in ws]))
            fused.down_proj_bias = nn.Parameter(torch.stack([w.down_bias for w in ws]))
        else:
            fused.gate_up_proj = nn.Parameter(torch.stack([torch.cat([w.gate, w.up]) for w in ws]))
            fused.down_proj = nn.Parameter(torch.stack([w.down for w in ws]))
        leftover = [n for n, t in fused.named_parameters() if t.device != device]
        if leftover:
            raise RuntimeError(f"fused experts of layer {layer_idx}: {leftover} not set")
        layer.block.experts = fused


# ----- merge experts ------------------------------------------------------------------------------------------
def one_hot_picks(matrix: torch.Tensor) -> list[int] | None:
    """Row picks of a one-hot [E', E] matrix with distinct rows (a pure selection), else None."""
    ones = (matrix == 1).sum(dim=1) == 1
    zeros = (matrix == 0).sum(dim=1) == matrix.shape[1] - 1
    if not bool((ones & zeros).all()):
        return None
    picks = matrix.argmax(dim=1).tolist()
    return picks if len(set(picks)) == len(picks) else None


def merge_experts(model: nn.Module, layer_idx: int, merge: torch.Tensor, router_map: torch.Tensor | None = None):
    """Replace the E experts of one layer by E' = merge.shape[0] linear combinations θ'_j = Σ_i merge[j,i]·θ_i
    (same coefficients for gate, up and down, as in EEP), and route with `router_map` [E',E] (default: `merge`).

    A one-hot router map with distinct rows is applied as plain row slicing (stock-loadable); any other map needs
    a renormalising softmax router (Mixtral-style semantics) and installs a `MappedRouter`.
    """
    layer = moe_layer(model, layer_idx)
    if layer is None:
        raise UserError(f"layer {layer_idx} is not an MoE layer")
    router_map = merge if router_map is None else router_map
    n_new, n_old = merge.shape
    if n_old != layer.num_experts or router_map.shape != merge.shape:
        raise UserError(f"layer {layer_idx}: merge and router maps must be [E', {layer.num_experts}]")
    if len(set(layer.widths())) != 1:
        raise UserError(f"layer {layer_idx}: experts of different widths cannot be merged")
    picks = one_hot_picks(router_map)
    if picks is None and not (layer.spec.routing == "softmax_topk" and layer.norm_topk_prob):
        raise UserError(
            f"a real-valued router map needs a renormalising softmax router (Mixtral, Qwen3/OLMoE with "
            f"norm_topk_prob); {layer.spec.name} must use one-hot maps (pure selection)"
        )
    check_routable(layer, range(n_new) if picks is None else picks)
    if picks is not None and uses_groups(layer.spec, layer.config) and picks != sorted(picks):
        raise UserError(f"layer {layer_idx}: with group-limited routing merged experts must keep ascending order")
    with torch.no_grad():
        experts = layer.experts if not isinstance(layer.experts, ExpertList) else to_expert_list(layer)
        if isinstance(experts, ExpertList):
            raise UserError("merging packed/variable experts is not supported; merge before quantizing")
        coef = merge.to(experts.down_proj.dtype)
        for name, param in list(experts.named_parameters(recurse=False)):
            merged = torch.einsum("ji,i...->j...", coef, param.data)
            setattr(experts, name, nn.Parameter(merged, requires_grad=param.requires_grad))
        if picks is not None:
            slice_router(layer.router, picks)
        else:
            setattr(layer.block, layer.spec.router_attr, MappedRouter(layer.router.weight, router_map, layer.top_k))
        _set_count(layer, n_new)
    sync_config(model)
