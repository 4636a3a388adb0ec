"""Calibration passes: run the model over a CalibrationSet with the reference MoE forward swapped in, and let
every requested collector see every MoE block. One pass serves every collector.

* `run_full(model, calib, collectors, batch_size=8, backward=None, loss_reduction="sum")` — whole-model forward
  (under `torch.inference_mode`; the decoder stack only — statistics need no logits, so the LM head is skipped), or forward + backward of the next-token loss when a collector `needs_grad`
  (`backward=None` decides from the collectors): eval mode (no jitter, pitfall 17), grad enabled, parameters
  frozen, the embedding output made to require grad so autograd tracks activations only; padding is ignored by
  the loss (labels -100) and by every statistic.
* `run_sequential(model, calib, collectors, batch_size=8, callback=None)` — GPTQ/CAMERA-style layer-by-layer
  pass: capture every decoder layer's call arguments (hidden states of layer 0 plus the kwargs the model builds —
  position embeddings, per-layer-type attention masks, position ids) with pass-through stand-ins, then run one
  decoder layer at a time over all batches; `callback(layer_idx, decoder_layer, moe_layer | None, stats)` may
  compress the layer before its outputs are recomputed and propagated. Forward only.

Both engines work on models loaded with an accelerate `device_map` that offloads to CPU or disk: the experts'
fused tensors are read directly by the reference forward (no module call would onload them), so each decoder
layer's offloaded submodules are onloaded for the duration of that layer and released after it.

Every pass counts routed tokens per (layer, expert) — even when no `routing` collector was asked for — and
returns them with the never-routed and rarely-routed experts (below `rare_threshold` tokens) in its facts, and
logs them (pitfall 1).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from moecompress.calibration.collectors import Collector, PassContext
from moecompress.calibration.data import CalibrationSet
from moecompress.compress.moe import MoELayer, decoder_layers, instrumented, moe_layers
from moecompress.errors import UserError

log = logging.getLogger("moecompress")

PASSES = {"full": 0, "backward": 0, "sequential": 0}  # how many passes this process ran (tests, benchmarks)
RARE_THRESHOLD = 16  # routed tokens below which an expert's statistics are called noisy


class _Dispatch:
    """The observer handed to the reference forward: filters padding, detaches, tallies routing, fans out."""

    def __init__(self, collectors: list[Collector], grad: bool = False):
        self.collectors = collectors
        self.grad_collectors = [c for c in collectors if c.needs_grad]
        self.grad = grad
        self.ctx = PassContext()
        for c in collectors:
            c.ctx = self.ctx
        self.enabled = True
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}

    def on_expert(self, layer, expert, tokens, x, weight, a, y) -> None:
        if not self.enabled or _recomputing():
            return
        keep = None if self.ctx.keep is None else self.ctx.keep[tokens]
        if self.grad:
            for c in self.grad_collectors:
                c.on_expert_grad(layer, expert, a, keep)
            x, weight, a, y = x.detach(), weight.detach(), a.detach(), y.detach()
        if keep is not None:
            if not bool(keep.any()):
                return
            if not bool(keep.all()):
                tokens, x, weight, a, y = tokens[keep], x[keep], weight[keep], a[keep], y[keep]
        for c in self.collectors:
            c.on_expert(layer, expert, tokens, x, weight, a, y)

    def on_block(self, layer, x, routing, routed, shared) -> None:
        if not self.enabled or _recomputing():
            return
        from moecompress.compress.moe import Routing

        keep = self.ctx.keep
        x, routed = x.detach(), routed.detach()
        shared = None if shared is None else shared.detach()
        routing = Routing(routing.logits.detach(), routing.weights.detach(), routing.index)
        if keep is not None:
            x, routed = x[keep], routed[keep]
            shared = None if shared is None else shared[keep]
            routing = Routing(routing.logits[keep], routing.weights[keep], routing.index[keep])
        i, n = layer.layer_idx, layer.num_experts
        index = routing.index.reshape(-1)
        index = index[(index >= 0) & (index < n)]
        counts = torch.bincount(index, minlength=n)
        self.counts[i] = counts if i not in self.counts else self.counts[i] + counts
        self.tokens[i] = self.tokens.get(i, 0) + len(x)
        counts_f = counts.double()
        for c in self.collectors:
            c.on_block(layer, x, routing, routed, shared)
            c.add_counts(i, n, counts_f)

    def report(self, threshold: int) -> dict[str, Any]:
        never = {i: (c == 0).nonzero().flatten().tolist() for i, c in sorted(self.counts.items())}
        rare = {i: ((c > 0) & (c < threshold)).nonzero().flatten().tolist() for i, c in sorted(self.counts.items())}
        return {
            "routed_tokens": {i: c.tolist() for i, c in sorted(self.counts.items())},
            "valid_tokens_per_layer": dict(sorted(self.tokens.items())),
            "never_routed": {i: e for i, e in never.items() if e},
            "rarely_routed": {i: e for i, e in rare.items() if e},
            "rare_threshold": threshold,
        }


def _recomputing() -> bool:
    """Whether this forward is activation checkpointing's recomputation inside a backward (already observed)."""
    return torch._C._current_graph_task_id() != -1


@contextmanager
def checkpointed_layers(model: nn.Module):
    """Activation checkpointing per decoder layer for a forward + backward pass in eval mode (transformers' own
    switch acts in training mode only): each layer keeps its input and recomputes its internals during the
    backward (non-reentrant `torch.utils.checkpoint`; the recomputation is not observed again)."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)

    def wrap(layer):
        inner = layer.forward

        def forward(*args, **kwargs):
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        return forward

    for layer in layers:
        layer.forward = wrap(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def log_routing_report(facts: dict[str, Any]) -> None:
    """Warn per layer about never-routed experts (scored 0) and rarely-routed ones (noisy statistics)."""
    threshold = facts.get("rare_threshold", RARE_THRESHOLD)
    for layer, experts in facts.get("never_routed", {}).items():
        log.warning("layer %s: experts %s were never routed during calibration (statistics 0, scored 0)",
                    layer, experts)
    for layer, experts in facts.get("rarely_routed", {}).items():
        log.warning("layer %s: experts %s were routed fewer than %d tokens (noisy statistics)",
                    layer, experts, threshold)


def progress_bar(description: str, unit: str = "seq") -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} " + unit),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
    )


# ----- offload support -----------------------------------------------------------------------------------------
def _offloaded(module: nn.Module) -> list[nn.Module]:
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # accelerate not installed: nothing can be offloaded
        return []
    return [m for m in module.modules() if has_offloaded_params(m)]


@contextmanager
def onloaded(module: nn.Module):
    """Bring every offloaded submodule of `module` (accelerate CPU/disk offload) onto its execution device for the
    duration of the block, then release it; a no-op for ordinary models."""
    mods = _offloaded(module)
    if not mods:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in mods:
            stack.enter_context(align_module_device(m))
        yield


@contextmanager
def _onload_per_layer(model: nn.Module):
    """For a full pass over an offloaded model: onload each decoder layer's offloaded tensors around its call."""
    layers = [l for l in decoder_layers(model) if _offloaded(l)]
    handles, stacks = [], {}

    def pre(module, args):
        stack = ExitStack()
        stack.enter_context(onloaded(module))
        stacks[id(module)] = stack

    def post(module, args, output):
        stack = stacks.pop(id(module), None)
        if stack is not None:
            stack.close()

    for layer in layers:
        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in stacks.values():
            stack.close()


def _execution_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


# ----- shared setup --------------------------------------------------------------------------------------------
@contextmanager
def _observing(model: nn.Module, collectors: list[Collector], grad: bool):
    dispatch = _Dispatch(collectors, grad=grad)
    handles = []
    if any(c.needs_residual for c in collectors):
        handles += _residual_taps(model, dispatch.ctx)
    for c in collectors:
        handles += c.attach(model)
    try:
        with instrumented(model, dispatch) as layers:  # padding is filtered by the dispatch (grad needs it so)
            yield dispatch, layers
    finally:
        for h in handles:
            h.remove()


def _residual_taps(model: nn.Module, ctx: PassContext) -> list:
    """Pre-hooks on each MoE decoder layer's `post_attention_layernorm`: its input is the residual stream that
    enters the MoE sub-block (every supported family normalises there right before the MoE block)."""
    handles = []
    layers = decoder_layers(model)
    for moe in moe_layers(model):
        norm = getattr(layers[moe.layer_idx], "post_attention_layernorm", None)
        if norm is None:
            raise UserError(f"{type(model).__name__} layer {moe.layer_idx} has no post_attention_layernorm; "
                            f"use easy_ep hidden=block_input")

        def tap(module, args, idx=moe.layer_idx):
            h = args[0]
            ctx.residual[idx] = h.detach().reshape(-1, h.shape[-1])

        handles.append(norm.register_forward_pre_hook(tap))
    return handles


def _check_collectors(collectors: list[Collector]) -> None:
    names = [c.name for c in collectors]
    if len(set(names)) != len(names):
        raise UserError(f"each collector may be requested once per pass, got {names}")


def _valid_offsets(calib: CalibrationSet, batch_size: int) -> list[int]:
    offsets, total = [], 0
    for _, mask in calib.batches(batch_size):
        offsets.append(total)
        total += int(mask.sum())
    return offsets


def _keep(mask: torch.Tensor) -> torch.Tensor | None:
    flat = mask.reshape(-1).bool()
    return None if bool(flat.all()) else flat


def _finish(kind: str, dispatch: _Dispatch, calib: CalibrationSet, tokens: int, start: float,
            rare_threshold: int, names: list[str]) -> dict[str, Any]:
    seconds = time.perf_counter() - start
    PASSES[kind] += 1
    log.info("calibration pass: %s (%s) — %d sequences, %d tokens, %.1f s, %.0f tok/s", ", ".join(names) or "-",
             kind, len(calib.input_ids), tokens, seconds, tokens / max(seconds, 1e-9))
    facts = {"engine": kind, "tokens": tokens, "seconds": round(seconds, 3), "sequences": len(calib.input_ids),
             "collectors": names}
    facts.update(dispatch.report(rare_threshold))
    log_routing_report(facts)
    return facts


# ----- full-model pass -----------------------------------------------------------------------------------------
def run_full(model: nn.Module, calib: CalibrationSet, collectors: list[Collector], batch_size: int = 8,
             description: str = "calibrating", backward: bool | None = None, loss_reduction: str | None = None,
             rare_threshold: int = RARE_THRESHOLD, checkpoint: bool = False) -> dict[str, Any]:
    """One full-model pass over `calib` (forward, or forward + backward); returns pass facts (tokens, seconds,
    routed tokens per expert, never/rarely-routed experts). `checkpoint`: activation checkpointing per decoder
    layer in the backward pass (same statistics, less activation memory)."""
    _check_collectors(collectors)
    grad = any(c.needs_grad for c in collectors) if backward is None else backward
    if loss_reduction is None:
        wanted = {c.config().get("loss_reduction") for c in collectors if c.needs_grad} - {None}
        if len(wanted) > 1:
            raise UserError(f"gradient collectors disagree on loss_reduction {sorted(wanted)}; use one")
        loss_reduction = wanted.pop() if wanted else "sum"
    model.eval()
    device = _execution_device(model)
    offsets = _valid_offsets(calib, batch_size)
    start = time.perf_counter()
    done = 0
    with ExitStack() as stack:
        dispatch, _ = stack.enter_context(_observing(model, collectors, grad))
        stack.enter_context(_onload_per_layer(model))
        bar = stack.enter_context(progress_bar(description))
        if grad:
            stack.enter_context(_frozen_params(model))
            stack.enter_context(_embeddings_require_grad(model))
            stack.enter_context(torch.enable_grad())
            if checkpoint:
                stack.enter_context(checkpointed_layers(model))
        else:
            stack.enter_context(torch.inference_mode())
        task = bar.add_task(description, total=len(calib.input_ids), rate="")
        for b, (input_ids, mask) in enumerate(calib.batches(batch_size)):
            dispatch.ctx.set_batch(_keep(mask), offsets[b])
            input_ids, mask_d = input_ids.to(device), mask.to(device)
            if grad:
                logits = model(input_ids=input_ids, attention_mask=mask_d, use_cache=False).logits
                next_token_loss(logits, input_ids, mask_d, loss_reduction).backward()
                del logits
            else:  # statistics need no logits: run the decoder stack only (skips the LM head)
                getattr(model, "model", model)(input_ids=input_ids, attention_mask=mask_d, use_cache=False)
            done += int(mask.sum())
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(input_ids), rate=f"{rate:,.0f} tok/s")
    return _finish("backward" if grad else "full", dispatch, calib, done, start, rare_threshold,
                   [c.name for c in collectors])


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                    reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of token t+1 given ≤ t; padding (mask 0) ignored; `sum` over valid targets or `mean`."""
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
        reduction=reduction)


@contextmanager
def _frozen_params(model: nn.Module):
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def _embeddings_require_grad(model: nn.Module):
    def hook(module, args, output):
        return output.requires_grad_(True) if not output.requires_grad else output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----- sequential layer-by-layer pass --------------------------------------------------------------------------
class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stand-in for a decoder layer during capture: records its call arguments and passes hidden states through."""

    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to take their extra arguments by keyword")
        self.sink[self.index] = kwargs
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        if self.last:
            raise _Stop
        return hidden_states


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The hidden states entering decoder layer 0 and every decoder layer's keyword arguments for one batch, as
    the stock model builds them (so per-layer attention masks — sliding vs full — are right), without running
    any decoder layer."""
    layers = decoder_layers(model)
    sink: dict = {}
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Catcher(i, i == len(layers) - 1, sink)
    try:
        base = getattr(model, "model", model)
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sink["hidden"], [sink[i] for i in range(len(layers))]


@contextmanager
def _access(layer_access, layers, i: int):
    if layer_access is None:
        with onloaded(layers[i]):
            yield layers[i]
    else:
        with layer_access(i) as layer:
            yield layer


def run_sequential(model: nn.Module, calib: CalibrationSet, collectors: list[Collector], batch_size: int = 8,
                   callback: Callable[[int, nn.Module, MoELayer | None, dict[str, Collector]], None] | None = None,
                   description: str = "calibrating (layer-wise)",
                   rare_threshold: int = RARE_THRESHOLD, before: Callable[[int, nn.Module], None] | None = None,
                   after: Callable[[int, nn.Module], None] | None = None, layer_access=None,
                   recompute: bool = True) -> dict[str, Any]:
    """Layer-by-layer forward pass: capture layer-0 inputs and every layer's kwargs, then for each decoder layer
    run all batches through it (collectors observe its MoE block), call `callback` (which may compress the layer),
    recompute the layer's outputs if a callback ran (and `recompute`), and propagate them to the next layer.

    `layer_access(i, keep)` is the context manager that makes decoder layer i real for the duration (a
    `compress.onload` holder's `layer`: accelerate onloading, or reading the layer from the checkpoint's shards);
    by default accelerate-offloaded submodules are onloaded. `before(i, layer)` runs once the layer is real,
    before its batches (e.g. RTN of its attention); `after(i, layer)` runs last while it is still real (e.g.
    writing it out) — with `after`, the layer is kept real until `after` returns. Only one decoder layer is real
    at a time."""
    _check_collectors(collectors)
    if any(c.needs_grad for c in collectors):
        raise UserError("the sequential engine is forward-only; gradient collectors "
                        f"({', '.join(c.name for c in collectors if c.needs_grad)}) need the full-model engine")
    model.eval()
    device = _execution_device(model)
    offsets = _valid_offsets(calib, batch_size)
    batches = [(ids.to(device), mask) for ids, mask in calib.batches(batch_size)]
    layers = decoder_layers(model)
    moe_by_index = {m.layer_idx: m for m in moe_layers(model)}
    stats = {c.name: c for c in collectors}
    start = time.perf_counter()
    with torch.inference_mode():
        captured = [capture_layer_inputs(model, ids, mask.to(device)) for ids, mask in batches]
    hidden = [h for h, _ in captured]
    kwargs = [kw for _, kw in captured]
    del captured
    tokens = int(calib.attention_mask.sum())
    with ExitStack() as stack:
        dispatch, _ = stack.enter_context(_observing(model, collectors, grad=False))
        bar = stack.enter_context(progress_bar(description, unit="layer·batch"))
        task = bar.add_task(description, total=len(layers) * len(batches), rate="")
        for i in range(len(layers)):
            with _access(layer_access, layers, i) as layer:
                if before is not None:
                    before(i, layer)
                    layer = layers[i]
                outs = []
                with torch.inference_mode():
                    for b, h in enumerate(hidden):
                        dispatch.ctx.set_batch(_keep(batches[b][1]), offsets[b])
                        outs.append(layer(h, **kwargs[b][i]))
                        done = i * len(batches) + b + 1
                        rate = done * tokens / len(batches) / max(time.perf_counter() - start, 1e-9) / len(layers)
                        bar.update(task, completed=done, rate=f"{rate:,.0f} tok/s")
                if callback is not None:
                    callback(i, layer, moe_by_index.get(i), stats)  # may compress (or replace) layers[i]
                    if recompute:
                        dispatch.enabled = False
                        with torch.inference_mode():
                            outs = [layers[i](h, **kwargs[b][i]) for b, h in enumerate(hidden)]
                        dispatch.enabled = True
                if after is not None:
                    after(i, layers[i])
            hidden = outs
    return _finish("sequential", dispatch, calib, tokens, start, rare_threshold, [c.name for c in collectors])
