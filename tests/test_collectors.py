"""Every collector equals a brute-force recomputation on a tiny model of every family.

The brute force never goes through the reference forward: it runs the *stock* model (float64, eager experts) with
plain hooks that capture each MoE block's input / output and the residual stream, then, token by token, calls the
stock router module and the stock experts module (one-hot routing) and recomputes the intermediate activation from
the raw expert tensors (checked against the stock experts' output). Gradients come from a stock backward pass:
∂L/∂a = g · W_downᵀ · ∂L/∂(block output).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from moecompress.calibration.collectors import (
    BlockIO, ChannelGrads, ChannelStats, EasyEPScore, GramStats, ReapSaliency, RoutingCounts, make_collector)
from moecompress.calibration.data import CalibrationSet
from moecompress.calibration.engine import run_full
from moecompress.compress.experts import ExpertList
from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.errors import UserError
from tiny_models import FAMILIES, tiny_model

TOL = {"rtol": 1e-9, "atol": 1e-11}
FP32_ROUTERS = ("deepseek_v2", "deepseek_v3")  # their stock routers compute in float32 even in a float64 model


@pytest.fixture(autouse=True)
def _tolerance(request):
    family = getattr(request.node, "callspec", None) and request.node.callspec.params.get("family")
    TOL.update(rtol=1e-5, atol=1e-8) if family in FP32_ROUTERS else TOL.update(rtol=1e-9, atol=1e-11)


def f64_model(family, **overrides):
    model = tiny_model(family, **overrides)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    return model.double().eval()


def calib_set(batch: int = 3, length: int = 10, seed: int = 3) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in two rows, one in each batch of 2
    mask[2, -5:] = 0
    ids[mask == 0] = 1
    return CalibrationSet(ids, mask, "test", "fp")


# ----- brute force ---------------------------------------------------------------------------------------------
def raw_expert(layer, e):
    """(gate/up → a function, down → y function) from the raw expert storage, independent of MoELayer views."""
    experts = layer.block.experts
    if isinstance(experts, ExpertList):
        mlp = experts[e]
        act = experts.activation
        return (lambda x: act(mlp.gate_proj(x), mlp.up_proj(x))), (lambda a: mlp.down_proj(a)), \
            (lambda d: d @ mlp.down_proj.weight)
    if layer.spec.layout == "gpt_oss":
        gu, gb = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]
        down, db = experts.down_proj[e], experts.down_proj_bias[e]

        def inter(x):
            gate = (x @ gu[:, ::2] + gb[::2]).clamp(max=experts.limit)
            up = (x @ gu[:, 1::2] + gb[1::2]).clamp(-experts.limit, experts.limit)
            return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)

        return inter, (lambda a: a @ down + db), (lambda d: down @ d)
    width = experts.down_proj.shape[-1]
    gate, up = experts.gate_up_proj[e][:width], experts.gate_up_proj[e][width:]
    down = experts.down_proj[e]
    act = ACT2FN[layer.config.hidden_act]
    return (lambda x: act(x @ gate.T) * (x @ up.T)), (lambda a: a @ down.T), (lambda d: down.T @ d)


def brute_force(model, calib: CalibrationSet, grads: bool = False):
    """Per MoE layer: per valid token (in flat batch order) input x, residual h, block output, and per routed
    (token, expert): g, a, y, and (grads) ∂L/∂a. All from the stock modules."""
    layers = moe_layers(model)
    dec = decoder_layers(model)
    rec = {l.layer_idx: {"x": [], "h": [], "out": [], "dout": []} for l in layers}
    handles, outs = [], {}
    for l in layers:
        i = l.layer_idx
        handles.append(l.block.register_forward_hook(
            lambda m, args, out, i=i: outs.__setitem__(i, (args[0], out[0] if isinstance(out, tuple) else out))))
        handles.append(dec[i].post_attention_layernorm.register_forward_pre_hook(
            lambda m, args, i=i: rec[i]["h"].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    masks = []
    for b in range(0, len(calib.input_ids), 2):
        ids, mask = calib.input_ids[b:b + 2], calib.attention_mask[b:b + 2]
        masks.append(mask.reshape(-1).bool())
        with torch.set_grad_enabled(grads):
            logits = model(input_ids=ids, attention_mask=mask).logits
            for i, (x, out) in outs.items():
                if grads:
                    out.retain_grad()
            if grads:
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                model.zero_grad()
                loss.backward()
        for i, (x, out) in outs.items():
            rec[i]["x"].append(x.detach().reshape(-1, x.shape[-1]))
            rec[i]["out"].append(out.detach().reshape(-1, out.shape[-1]))
            if grads:
                rec[i]["dout"].append(out.grad.reshape(-1, out.shape[-1]))
    for h in handles:
        h.remove()
    valid = torch.cat(masks)
    result = {}
    for l in layers:
        i = l.layer_idx
        r = {k: torch.cat(v)[valid] for k, v in rec[i].items() if v}
        tokens = []
        with torch.no_grad():
            for t in range(len(r["x"])):  # token by token, on purpose
                x = r["x"][t:t + 1]
                logits, weights, index = getattr(l.block, l.spec.router_attr)(x)
                p = torch.sigmoid(logits.double()) if l.spec.routing == "deepseek_v3" else torch.softmax(
                    logits.double(), -1)
                p = p / p.sum()
                r["entropy"] = r.get("entropy", 0.0) + float(-(p * p.log()).sum())
                routed = torch.zeros_like(x)
                for pos in range(index.shape[1]):
                    e, g = int(index[0, pos]), weights[0, pos]
                    inter, down, down_t = raw_expert(l, e)
                    a = inter(x)
                    y = l.block.experts(x, torch.tensor([[e]]), torch.ones(1, 1, dtype=x.dtype))
                    assert torch.allclose(down(a), y, rtol=1e-10, atol=1e-12), "raw expert tensors misread"
                    routed += g * y
                    entry = {"t": t, "e": e, "g": float(g), "x": x[0], "a": a[0], "y": y[0]}
                    if grads:
                        entry["da"] = g * down_t(r["dout"][t])
                    tokens.append(entry)
                shared = r["out"][t] - routed[0]
                if l.shared_mlp is None:
                    assert torch.allclose(shared, torch.zeros_like(shared), atol=1e-10)
                r.setdefault("routed", []).append(routed[0])
        r["routed"] = torch.stack(r["routed"])
        r["tokens"] = tokens
        result[i] = r
    return result


def brute_shared(layer, x):
    """Shared expert channels a and their weight g, from the stock shared module."""
    mlp = layer.shared_mlp
    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    g = torch.sigmoid(layer.block.shared_expert_gate(x)) if layer.spec.shared == "qwen2" else torch.ones(len(x), 1,
                                                                                                      dtype=x.dtype)
    return a, g


def close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, **TOL), f"{what}: max diff {(a - b).abs().max().item()}"


def check_forward_collectors(model, stats, bf):
    for l in moe_layers(model):
        i, E = l.layer_idx, l.num_experts
        r = bf[i]
        widths = l.widths()
        count = torch.zeros(E, dtype=torch.float64)
        weight_sum = torch.zeros(E, dtype=torch.float64)
        gnorm, norm, score = (torch.zeros(E, dtype=torch.float64) for _ in range(3))
        sum_a2 = [torch.zeros(w, dtype=torch.float64) for w in widths]
        sum_ga2 = [torch.zeros(w, dtype=torch.float64) for w in widths]
        max_ga = [torch.zeros(w, dtype=torch.float64) for w in widths]
        xtx = torch.zeros(E, l.hidden_size, l.hidden_size, dtype=torch.float64)
        ata = [torch.zeros(w, w, dtype=torch.float64) for w in widths]
        h = r["h"]
        s = (1 - F.cosine_similarity(h, h + r["routed"], dim=-1)).clamp(min=0)
        for tok in r["tokens"]:
            e, g, a, y = tok["e"], tok["g"], tok["a"], tok["y"]
            count[e] += 1
            weight_sum[e] += g
            gnorm[e] += g * y.norm()
            norm[e] += y.norm()
            score[e] += g * y.norm() * s[tok["t"]]
            sum_a2[e] += a ** 2
            sum_ga2[e] += (g * a) ** 2
            max_ga[e] = torch.maximum(max_ga[e], (g * a).abs())
            xtx[e] += torch.outer(tok["x"], tok["x"])
            ata[e] += torch.outer(a, a)
        assert int(count.sum()) == len(r["x"]) * l.top_k  # coverage
        routing, reap, easy, ch, gram, bio = (stats[k] for k in
                                              ("routing", "reap", "easy_ep", "channels", "gram", "block_io"))
        close(routing.counts(i), count, f"layer {i} routing counts")
        close(routing.weight_sum(i), weight_sum, f"layer {i} routing weight_sum")
        assert routing.tokens(i) == len(r["x"])
        close(routing.mean_token_entropy(i), r["entropy"] / len(r["x"]), f"layer {i} router entropy")
        close(reap.counts(i), count, "reap counts")
        close(reap.gnorm_sum(i), gnorm, f"layer {i} reap Σg‖f‖")
        close(reap.saliency(i), torch.where(count > 0, gnorm / count.clamp(min=1), 0), f"layer {i} reap saliency")
        close(reap.ean(i), norm, f"layer {i} EAN")
        close(easy.score(i), score, f"layer {i} easy_ep score")
        close(easy.gnorm_sum(i), gnorm, f"layer {i} easy_ep Σg‖f‖")
        for e in range(E):
            close(ch.sum_a2(i, e), sum_a2[e], f"layer {i} expert {e} Σa²")
            close(ch.sum_ga2(i, e), sum_ga2[e], f"layer {i} expert {e} Σ(ga)²")
            close(ch.max_ga(i, e), max_ga[e], f"layer {i} expert {e} max|ga|")
            close(gram.xtx(i, e), xtx[e], f"layer {i} expert {e} XᵀX")
            close(gram.ata(i, e), ata[e], f"layer {i} expert {e} AᵀA")
        close(gram.counts(i), count, "gram counts")
        if l.shared_mlp is not None:
            a, g = brute_shared(l, r["x"])
            close(ch.shared_sum_a2(i), (a * a).sum(0), f"layer {i} shared Σa²")
            close(ch.shared_sum_ga2(i), ((g * a) ** 2).sum(0), f"layer {i} shared Σ(ga)²")
            close(ch.shared_max_ga(i), (g * a).abs().amax(0), f"layer {i} shared max|ga|")
        else:
            assert ch.shared_sum_a2(i) is None
        pos = bio.positions(i)
        assert len(pos) == min(bio.max_tokens, len(r["x"])) and len(set(pos.tolist())) == len(pos)
        close(bio.inputs(i), r["x"][pos], f"layer {i} block_io inputs")
        close(bio.outputs(i), r["out"][pos], f"layer {i} block_io outputs")


def all_forward():
    return [RoutingCounts(), ReapSaliency(), EasyEPScore(), ChannelStats(), GramStats(intermediate=True),
            BlockIO(max_tokens=11, seed=5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_collectors_match_brute_force(family):
    model = f64_model(family)
    calib = calib_set()
    collectors = all_forward()
    facts = run_full(model, calib, collectors, batch_size=2)
    stats = {c.name: c for c in collectors}
    bf = brute_force(model, calib)
    check_forward_collectors(model, stats, bf)
    # block_io keeps float32 samples; compare them loosely too (done above through float64 promotion)
    assert facts["tokens"] == calib.num_tokens
    for i, counts in facts["routed_tokens"].items():
        assert counts == stats["routing"].counts(i).long().tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_grads_match_brute_force(family):
    model = f64_model(family)
    calib = calib_set()
    collector = ChannelGrads()
    facts = run_full(model, calib, [collector], batch_size=2)
    assert facts["engine"] == "backward"
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the pass
    bf = brute_force(model, calib, grads=True)
    for l in moe_layers(model):
        i = l.layer_idx
        widths = l.widths()
        g2 = [torch.zeros(w, dtype=torch.float64) for w in widths]
        a2 = [torch.zeros(w, dtype=torch.float64) for w in widths]
        a2g2 = [torch.zeros(w, dtype=torch.float64) for w in widths]
        count = torch.zeros(l.num_experts, dtype=torch.float64)
        for tok in bf[i]["tokens"]:
            e = tok["e"]
            g2[e] += tok["da"] ** 2
            a2[e] += tok["a"] ** 2
            a2g2[e] += tok["a"] ** 2 * tok["da"] ** 2
            count[e] += 1
        close(collector.counts(i), count, "grad counts")
        for e in range(l.num_experts):
            close(collector.sum_g2(i, e), g2[e], f"layer {i} expert {e} Σ(∂L/∂a)²")
            close(collector.sum_a2(i, e), a2[e], f"layer {i} expert {e} Σa²")
            close(collector.sum_a2g2(i, e), a2g2[e], f"layer {i} expert {e} Σa²(∂L/∂a)²")
            n = max(float(count[e]), 1.0)
            close(collector.heapr_score(i, e), 0.5 * (a2[e] / n) * (g2[e] / n) * (count[e] > 0), "heapr score")


def test_variable_width_experts_match_brute_force():
    """After channel pruning (an ExpertList with per-expert widths, one expert of width 0) every per-channel
    collector still matches, padded storage sliced back to each expert's width."""
    from moecompress.compress.surgery import keep_channels

    model = f64_model("qwen2_moe")
    widths = {0: list(range(16)), 1: [0, 3, 5], 2: [], 3: list(range(0, 16, 2))}
    keep_channels(model, {l.layer_idx: widths for l in moe_layers(model)}, {1: list(range(10))})
    assert moe_layers(model)[0].widths()[:4] == [16, 3, 0, 8]
    calib = calib_set()
    collectors = all_forward()
    run_full(model, calib, collectors, batch_size=2)
    check_forward_collectors(model, {c.name: c for c in collectors}, brute_force(model, calib))
    grads = ChannelGrads()
    run_full(model, calib, [grads], batch_size=2)
    assert grads.sum_g2(0, 2).shape == (0,) and grads.sum_g2(0, 1).shape == (3,)


def test_never_routed_experts_stay_finite(caplog):
    """An expert the router never picks: count 0, every statistic finite (0), and the pass reports it."""
    model = f64_model("qwen3_moe")
    layer = moe_layers(model)[0]

    def never5(module, args, out):  # the stock router with expert 5 masked out of the selection
        logits = out[0].clone()
        logits[:, 5] = float("-inf")
        weights, index = torch.topk(torch.softmax(logits, -1), layer.top_k, dim=-1)
        return out[0], weights / weights.sum(-1, keepdim=True), index

    layer.router.register_forward_hook(never5)
    collectors = all_forward() + [ChannelGrads()]
    caplog.set_level("WARNING", logger="moecompress")
    facts = run_full(model, calib_set(), collectors[:-1], batch_size=2)
    run_full(model, calib_set(), collectors[-1:], batch_size=2)
    stats = {c.name: c for c in collectors}
    i = layer.layer_idx
    assert stats["routing"].counts(i)[5] == 0 and facts["never_routed"][i] == [5]
    assert f"layer {i}: experts [5] were never routed" in caplog.text
    for value in [stats["reap"].saliency(i), stats["easy_ep"].score(i), stats["channels"].sum_a2(i, 5),
                  stats["channels"].max_ga(i, 5), stats["gram"].xtx(i, 5), stats["channel_grads"].heapr_score(i, 5)]:
        assert torch.isfinite(value).all()
    assert stats["reap"].saliency(i)[5] == 0 and stats["channel_grads"].heapr_score(i, 5).abs().sum() == 0
    assert stats["gram"].counts(i)[5] == 0 and stats["reap"].saliency(i)[:5].gt(0).all()
    assert facts["rare_threshold"] == 16 and i in facts["rarely_routed"]  # 17 valid tokens × 2 over 7 experts


def test_make_collector_rejects_unknown_names_and_options():
    with pytest.raises(UserError, match="unknown collector 'nope'; available: block_io"):
        make_collector("nope")
    with pytest.raises(UserError, match="collector 'gram'"):
        make_collector("gram", bogus=1)
    with pytest.raises(UserError, match="easy_ep hidden"):
        make_collector("easy_ep", hidden="x")
