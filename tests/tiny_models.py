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


CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n\n"
    "In the beginning was the word, and the word was with the model.\n\n"
    "37 + 48 = 85. 12 * 7 = 84. The capital of Varnia is Oltrek.\n\n"
    "def add(a, b): return a + b  # technical text for calibration\n\n"
) * 8


def tiny_tokenizer(vocab_size: int = 97):
    """A small BPE tokenizer (vocab ≤ the tiny models' 97) wrapped as a standard HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  limit_alphabet=60)
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def save_tiny(model_type: str, path, **overrides):
    """A tiny random model of `model_type` with a tokenizer and a calibration text file, on disk."""
    from pathlib import Path

    path = Path(path)
    model = tiny_model(model_type, **overrides)
    model.config.eos_token_id = 2
    model.config.pad_token_id = 1
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def calibration_file(path):
    from pathlib import Path

    path = Path(path)
    path.write_text(CORPUS)
    return path
