"""Tiny random models of every supported family, built from transformers' own config classes."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)

FAMILY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=8, decoder_sparse_step=1),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, num_key_value_heads=4,
                        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                        n_group=2, topk_group=1, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, num_key_value_heads=4,
                        q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "phimoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}

FAMILIES = sorted(FAMILY_CONFIGS)


def tiny_config(model_type: str, **overrides):
    kwargs = {**COMMON, **FAMILY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # random routers and non-trivial score biases so routing is not degenerate
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model.eval()


def tokens(batch: int = 2, length: int = 12, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
