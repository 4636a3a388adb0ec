"""Train the reference MoE models on the bundled corpus (CPU, fp32, fixed seeds) and cache them.

A reference model is a plain ``save_pretrained`` directory under ``home()/reference/<name>/``: weights, config,
tokenizer, and ``reference.json`` (training facts and base scores). Builds go to a temporary directory that is
renamed into place at the end, so a half-built model is never visible.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moecompress.errors import UserError
from moecompress.paths import atomic_directory, subdir
from moecompress.reference import corpus
from moecompress.reference.tokenizer import VOCAB_SIZE, load_tokenizer, tokenizer_key

BUILD_VERSION = 3


@dataclass(frozen=True)
class ReferenceSpec:
    name: str
    family: str  # "qwen3_moe" | "deepseek_v3"
    description: str
    arch: dict[str, Any]  # config keyword arguments
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 1234
    threads: int = 2
    aux_loss_coef: float = 0.01  # Qwen3-MoE: config.router_aux_loss_coef; DeepSeek-V3: our switch-style loss
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing (e_score_correction_bias step)
    domain_weights: dict[str, float] = field(
        default_factory=lambda: {"prose": 0.3, "technical": 0.2, "arithmetic": 0.25, "facts": 0.25}
    )
    eval_limit: int | None = None  # MC items per task scored at the end of the build (None: all)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


_COMMON_QWEN = dict(
    vocab_size=VOCAB_SIZE,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    output_router_logits=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

# _TRAINED_CONTEXT: every spec declares max_position_embeddings = seq_len, the context it is trained on. lm-eval
# sizes its perplexity windows from max_position_embeddings; positions never seen in training make the loss climb
# (build version 3 at 512 with 256-token training: per-token loss 0.2 -> 1.1 (small) and 4.7 (small-shared) past
# position 256). With default RoPE the value does not enter training: the weights are bit-identical either way.
SPECS: dict[str, ReferenceSpec] = {
    "tiny": ReferenceSpec(
        name="tiny",
        family="qwen3_moe",
        description="Qwen3-MoE, 2 layers, hidden 64, 8 experts top-2; the test-suite model (~1 min to build)",
        arch=dict(
            _COMMON_QWEN,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=128,  # = seq_len (see _TRAINED_CONTEXT)
        ),
        steps=300,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup=30,
        threads=1,  # the test-suite builds it next to other pytest-xdist workers
        aux_loss_coef=0.02,
        eval_limit=60,
    ),
    "small": ReferenceSpec(
        name="small",
        family="qwen3_moe",
        description="Qwen3-MoE, 4 layers, hidden 160, 16 experts top-2 (~14 min to build on 2 cores)",
        arch=dict(
            _COMMON_QWEN,
            hidden_size=160,
            intermediate_size=384,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=40,
            num_experts=16,
            num_experts_per_tok=2,
            max_position_embeddings=256,  # = seq_len (see _TRAINED_CONTEXT)
        ),
        steps=1800,
        batch_size=16,
        seq_len=256,
        lr=2e-3,
        warmup=100,
        aux_loss_coef=0.01,
        # arithmetic needs the most exposure (digits are learnt late); facts are learnt early
        domain_weights={"prose": 0.3, "technical": 0.25, "arithmetic": 0.3, "facts": 0.15},
    ),
    "small-shared": ReferenceSpec(
        name="small-shared",
        family="deepseek_v3",
        description="DeepSeek-V3 (MLA, shared expert, sigmoid group-limited routing), 4 layers (first dense), "
        "hidden 160, 16 routed experts top-2 (~18 min to build on 2 cores)",
        arch=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=160,
            intermediate_size=384,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=16,
            routed_scaling_factor=1.0,
            kv_lora_rank=64,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            v_head_dim=32,
            qk_nope_head_dim=32,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            hidden_act="silu",
            max_position_embeddings=256,  # = seq_len (see _TRAINED_CONTEXT)
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_interleave=True,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            initializer_range=0.02,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        steps=1400,
        batch_size=16,
        seq_len=256,
        lr=2e-3,
        warmup=100,
        aux_loss_coef=0.003,
        bias_update_rate=0.002,
        domain_weights={"prose": 0.3, "technical": 0.25, "arithmetic": 0.3, "facts": 0.15},
    ),
}

REFERENCE_NAMES: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> ReferenceSpec:
    if name not in SPECS:
        raise UserError(f"unknown reference model {name!r}: use one of {', '.join(REFERENCE_NAMES)}")
    return SPECS[name]


def reference_root() -> Path:
    return subdir("reference")


def reference_dir(name: str) -> Path:
    return reference_root() / name


def is_built(name: str) -> bool:
    """True when a build of the current spec and build version is cached (an older build is rebuilt on demand)."""
    d = reference_dir(name)
    if not ((d / "reference.json").is_file() and (d / "config.json").is_file()):
        return False
    info = json.loads((d / "reference.json").read_text())
    same_spec = _training_spec(info.get("spec") or {}) == _training_spec(asdict(get_spec(name)))
    return info.get("build_version") == BUILD_VERSION and same_spec


def _training_spec(spec: dict) -> dict:
    """What determines the trained weights: the spec without its free-text description (JSON-normalised)."""
    return json.loads(json.dumps({k: v for k, v in spec.items() if k != "description"}))


def reference_path(name: str) -> Path:
    """The directory of a built reference model; UserError naming the build command if it is not built."""
    get_spec(name)
    if not is_built(name):
        raise UserError(
            f"reference model {name!r} is not built yet (or was built by an older moecompress): run "
            f"`moecompress reference build {name}` "
            f"(it is cached under {reference_dir(name)})"
        )
    return reference_dir(name)


# ---------------------------------------------------------------------------------------------- model + data


def make_config(spec: ReferenceSpec):
    if spec.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**spec.arch, router_aux_loss_coef=spec.aux_loss_coef)
    if spec.family == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(**spec.arch)
    raise AssertionError(spec.family)


def make_model(spec: ReferenceSpec):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    config = make_config(spec)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model


class _Streams:
    """One token stream per domain (``<s> doc </s>`` packed, documents in seeded order); seeded window sampler."""

    def __init__(self, tokenizer, spec: ReferenceSpec, max_tokens_per_domain: int):
        import numpy as np

        self.spec = spec
        self.streams: dict[str, Any] = {}
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        for dom in corpus.DOMAINS:
            docs = list(corpus.documents(dom, "train"))
            random.Random(f"{spec.seed}/{dom}").shuffle(docs)
            ids: list[int] = []
            step = 256
            for i in range(0, len(docs), step):
                for row in tokenizer(docs[i : i + step], add_special_tokens=False, verbose=False)["input_ids"]:
                    ids.append(bos)
                    ids.extend(row)
                    ids.append(eos)
                if len(ids) >= max_tokens_per_domain:
                    break
            self.streams[dom] = np.asarray(ids[:max_tokens_per_domain], dtype=np.int64)
        self.domains = [d for d in corpus.DOMAINS if spec.domain_weights.get(d, 0) > 0]
        w = np.array([spec.domain_weights[d] for d in self.domains], dtype=np.float64)
        self.weights = w / w.sum()
        self.rng = np.random.default_rng(spec.seed)

    def batch(self):
        import numpy as np
        import torch

        n = self.spec.seq_len
        doms = self.rng.choice(len(self.domains), size=self.spec.batch_size, p=self.weights)
        rows = []
        for d in doms:
            s = self.streams[self.domains[d]]
            start = int(self.rng.integers(0, len(s) - n))
            rows.append(s[start : start + n])
        return torch.from_numpy(np.stack(rows))

    def token_counts(self) -> dict[str, int]:
        return {d: int(len(s)) for d, s in self.streams.items()}


class _DeepseekBalancer:
    """DeepSeek-V3 load balancing for training: switch-style auxiliary loss on the sigmoid scores, and the
    aux-loss-free bias update (``e_score_correction_bias += rate * sign(mean load - load)``). transformers' DeepSeek-V3
    forward has no balancing loss of its own, so without this the routers collapse."""

    def __init__(self, model, spec: ReferenceSpec):
        import torch

        self.spec = spec
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.records: list[tuple[Any, Any]] = []
        self.handles = [g.register_forward_hook(self._hook) for g in self.gates]
        self.torch = torch

    def _hook(self, module, inputs, output):
        logits, _weights, idx = output
        self.records.append((logits, idx))

    def loss(self):
        torch = self.torch
        total = 0.0
        for logits, idx in self.records:
            e = logits.shape[-1]
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
            frac = torch.zeros(e, dtype=probs.dtype).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()
            total = total + e * (frac.detach() * probs.mean(0)).sum()
        return total / max(1, len(self.records))

    def update_bias(self):
        torch = self.torch
        with torch.no_grad():
            for gate, (_logits, idx) in zip(self.gates, self.records):
                e = gate.e_score_correction_bias.numel()
                load = torch.bincount(idx.reshape(-1), minlength=e).float()
                gate.e_score_correction_bias += self.spec.bias_update_rate * torch.sign(load.mean() - load)
        self.records.clear()

    def close(self):
        for h in self.handles:
            h.remove()


def _per_layer_balance_loss(router_logits, config):
    """Switch-style load-balancing loss (softmax routers), computed per layer and averaged over layers."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    losses = [load_balancing_loss_func((lg,), config.num_experts, config.num_experts_per_tok) for lg in router_logits]
    return sum(losses) / len(losses)


def _lr(spec: ReferenceSpec, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = min(spec.warmup, max(1, total // 10))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    spec: ReferenceSpec,
    tokenizer,
    progress: bool = True,
    steps: int | None = None,
    threads: int | None = None,
    log_every: int = 0,
) -> tuple[Any, dict]:
    """Train a reference model from scratch; returns (model in eval mode, training facts).

    ``threads`` defaults to the spec's (results are bit-identical for the same thread count and machine)."""
    import torch

    steps = spec.steps if steps is None else steps
    threads = spec.threads if threads is None else threads
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        torch.manual_seed(spec.seed)
        model = make_model(spec)
        model.train()
        data = _Streams(tokenizer, spec, max_tokens_per_domain=max(steps * spec.batch_size * spec.seq_len, 20_000))
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=spec.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        balancer = _DeepseekBalancer(model, spec) if spec.family == "deepseek_v3" else None
        losses: list[float] = []
        aux_losses: list[float] = []
        bar = _progress(progress)
        task = bar.add_task(f"training {spec.name}", total=steps, loss=float("nan")) if bar else None
        try:
            if bar:
                bar.start()
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = _lr(spec, step, steps)
                batch = data.batch()
                if balancer is None:
                    out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
                    lm_loss = out.loss - spec.aux_loss_coef * out.aux_loss
                    # transformers' aux loss pools all layers (an expert dead in one layer is hidden by another
                    # layer's same-index expert); balance each layer on its own instead.
                    aux_t = _per_layer_balance_loss(out.router_logits, model.config)
                    loss = lm_loss + spec.aux_loss_coef * aux_t
                    aux = float(aux_t.detach())
                else:
                    out = model(input_ids=batch, labels=batch, use_cache=False)
                    aux_t = balancer.loss()
                    lm_loss = out.loss
                    loss = out.loss + spec.aux_loss_coef * aux_t
                    aux = float(aux_t.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if balancer is not None:
                    balancer.update_bias()
                losses.append(float(lm_loss.detach()))
                aux_losses.append(aux)
                if not math.isfinite(losses[-1]):
                    raise RuntimeError(f"training {spec.name} diverged at step {step} (loss {losses[-1]})")
                if bar:
                    bar.update(task, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
                if log_every and (step + 1) % log_every == 0:
                    print(
                        f"{spec.name} step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                        f"aux {aux:.3f} {time.time() - t0:.0f}s",
                        flush=True,
                    )
        finally:
            if bar:
                bar.stop()
            if balancer is not None:
                balancer.close()
        model.eval()
        tail = losses[-min(50, len(losses)) :]
        facts = {
            "steps": steps,
            "batch_size": spec.batch_size,
            "seq_len": spec.seq_len,
            "tokens": steps * spec.batch_size * spec.seq_len,
            "final_loss": sum(tail) / len(tail),
            "first_loss": losses[0],
            "final_aux_loss": sum(aux_losses[-len(tail) :]) / len(tail),
            "loss_curve": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
            "train_seconds": round(time.time() - t0, 1),
            "threads": threads,
            "stream_tokens": data.token_counts(),
        }
        return model, facts
    finally:
        torch.set_num_threads(old_threads)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


# --------------------------------------------------------------------------------------------------- routing


def routing_load(model, tokenizer, texts: list[str], max_tokens: int = 256) -> list[list[float]]:
    """Fraction of routed assignments per expert, per MoE layer, on some texts (to check no expert is dead)."""
    import torch

    counts: list[Any] = []
    hooks = []
    for layer in model.model.layers:
        mlp = layer.mlp
        gate = getattr(mlp, "gate", None)
        if gate is None or not hasattr(mlp, "experts"):
            continue
        slot = len(counts)
        n = mlp.experts.num_experts
        counts.append(torch.zeros(n))

        def hook(module, inputs, output, slot=slot, n=n):
            idx = output[2]
            counts[slot] += torch.bincount(idx.reshape(-1), minlength=n).float()

        hooks.append(gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for t in texts:
                ids = tokenizer(t, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][:, :max_tokens]
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [(c / c.sum()).tolist() for c in counts]


# ----------------------------------------------------------------------------------------------------- build


def build_reference(
    name: str,
    force: bool = False,
    progress: bool = True,
    evaluate_base: bool = True,
    threads: int | None = None,
    log_every: int = 0,
) -> Path:
    """Build (train + save) a reference model unless it is already cached; returns its directory.

    ``progress`` shows a rich progress bar with the loss; ``log_every=N`` also prints a line every N steps (for logs).
    """
    spec = get_spec(name)
    final = reference_dir(name)
    if is_built(name) and not force:
        return final
    import torch

    t0 = time.time()
    tokenizer = load_tokenizer(model_max_length=spec.arch["max_position_embeddings"])
    model, facts = train(spec, tokenizer, progress=progress, threads=threads, log_every=log_every)

    domain_loads = {
        dom: routing_load(model, tokenizer, corpus.documents(dom, "validation")[:8]) for dom in corpus.DOMAINS
    }
    info: dict[str, Any] = {
        "name": name,
        "family": spec.family,
        "description": spec.description,
        "build_version": BUILD_VERSION,
        "corpus_version": corpus.CORPUS_VERSION,
        "corpus_fingerprint": corpus.fingerprint(),
        "tokenizer_key": tokenizer_key(),
        "spec": asdict(spec),
        "training": facts,
        "parameters": sum(p.numel() for p in model.parameters()),
        "routing_load": domain_loads,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if evaluate_base:
            from moecompress.evals.lmeval import evaluate, mc_task_names, summarize

            results = evaluate(model, tokenizer, tasks="reference", limit=spec.eval_limit)
            info["base_scores"] = summarize(results)
            info["base_scores_limit"] = spec.eval_limit
            info["base_scores_tasks"] = mc_task_names()
        info["build_seconds"] = round(time.time() - t0, 1)
        (tmp / "reference.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    atomic_directory(final, write)
    return final


def reference_info(name: str) -> dict:
    """The ``reference.json`` of a built reference model."""
    return json.loads((reference_path(name) / "reference.json").read_text())
