# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM as a vLLM pooling model: vLLM's own implementation of the backbone, the ArmoRM heads, the ArmoRM pooler.

    h    = f(x ⊕ y)[last prompt token]                   response feature
    h_x  = f(x ⊕ y)[gating position]                     prompt feature (same pass; or the prefix cache's)
    r    = W h                                           k objective rewards (the length objective: log(1 + n))
    g    = β · softmax(MLP(h_x) / temperature)           gating weights (0 outside the gated objectives)
    s    = g · (r T),  c = g Tᵀ                          score and per-objective coefficients

The backbone is whatever decoder the checkpoint nests (its vLLM `*ForCausalLM` class, built without its LM head), so
tensor and pipeline parallelism, paged attention, chunked prefill and prefix caching are vLLM's. The heads are tiny and
run replicated in float32 (vLLM's `head_dtype` for pooling models), as `ArmoRMForRewardModeling` keeps them.
Both checkpoint layouts load: this package's (`model_type: "armorm"`, the backbone under `text_config`) and the
released `RLHFlow/ArmoRM-Llama3-8B-v0.1` one (a flat Llama config), read through `modeling_armorm.rlhflow.rlhflow_config`.
"""

from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    StageMissingLayer,
    WeightsMapper,
    maybe_prefix,
    no_init_weights,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import set_default_torch_dtype

from modeling_armorm import ArmoRMConfig, ArmoRMGatingNetwork
from modeling_armorm.heads import armorm_heads
from modeling_armorm.rlhflow import rlhflow_config

from .pooler import ArmoRMPooler
from .prompt_features import PromptFeatureStore
from .settings import ArmoRMVllmSettings


__all__ = ["ArmoRMRewardModel", "armorm_config"]


def armorm_config(hf_config) -> ArmoRMConfig:
    """The `ArmoRMConfig` of either checkpoint layout (the released flat Llama config through `rlhflow_config`)."""
    if isinstance(hf_config, ArmoRMConfig):
        return hf_config
    return rlhflow_config(hf_config.to_dict())


class ArmoRMRewardModel(nn.Module, SupportsPP):
    is_pooling_model = True
    # The checkpoint's backbone tensors are `model.*` (the transformers class's base model); here they belong to the
    # backbone's `*ForCausalLM`, which itself holds them as `model.*`.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": "backbone.model."})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if vllm_config.lora_config is not None:
            raise ValueError(
                "The ArmoRM vLLM plugin does not support LoRA adapters: its prompt-feature cache is keyed by tokens "
                "alone. Merge the adapter into the checkpoint (`peft` `merge_and_unload`) before serving it."
            )
        hf_config = vllm_config.model_config.hf_config
        self.config = armorm_config(hf_config)
        self.settings = ArmoRMVllmSettings.from_hf_config(hf_config)
        if not self.config.gating_token_pattern:
            raise ValueError(
                "The checkpoint's config has no `gating_token_pattern`, so the prompt feature cannot be located. Set "
                "it with `modeling_armorm.gating_pattern_from_tokenizer(tokenizer)` and save the config again."
            )
        text_config = hf_config.get_text_config()
        model_type = text_config.model_type
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"The backbone's model type {model_type!r} has no causal-LM class in transformers.")
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        backbone_config = vllm_config.with_hf_config(text_config, architectures=[architecture])
        backbone_class, _ = backbone_config.model_config.registry.resolve_model_cls(
            [architecture], model_config=backbone_config.model_config
        )
        # vLLM's own trick for pooling adapters: build the causal LM with its LM head (vocab × d) left out.
        with no_init_weights(
            self, lambda module: StageMissingLayer("output", module), targets=(LogitsProcessor, ParallelLMHead)
        ):
            self.backbone = initialize_model(
                backbone_config, prefix=maybe_prefix(prefix, "backbone"), model_class=backbone_class
            )

        head_dtype = vllm_config.model_config.head_dtype
        hidden_size, k = text_config.hidden_size, self.config.num_objectives
        with set_default_torch_dtype(head_dtype):
            self.regression_layer = nn.Linear(hidden_size, k, bias=False)
            self.gating = ArmoRMGatingNetwork(
                hidden_size,
                k,
                hidden_dim=self.config.gating_hidden_dim,
                n_hidden=self.config.gating_n_hidden,
                temperature=self.config.gating_temperature,
                gated_objectives=self.config.gated_objectives,
            )
            self.reward_transform_matrix = nn.Parameter(torch.eye(k), requires_grad=False)
        self.head_dtype = head_dtype

        store = PromptFeatureStore(
            self.settings.prompt_feature_entries, hidden_size, vllm_config.model_config.dtype, device=None
        )
        self.pooler = ArmoRMPooler(
            self.heads,
            k,
            self.config.gating_token_pattern,
            self.config.gating_token_offset,
            store,
            turn_header_patterns=self.config.turn_header_patterns,  # None for a checkpoint made before
        )
        self.make_empty_intermediate_tensors = self.backbone.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | IntermediateTensors:
        # The last hidden state after the final norm, one row per scheduled token; the pooler reads h and h_x in it.
        return self.backbone(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def heads(self, h: torch.Tensor, h_x: torch.Tensor, answer_tokens: torch.Tensor) -> torch.Tensor:
        """[s, r, g, c] for n requests from h (n, d), h_x (n, d) and the tokens after the gating position (n,)."""
        # The math of `ArmoRMForRewardModeling.forward`, the same function (`modeling_armorm.heads`).
        s, r, g, c = armorm_heads(
            h.to(self.head_dtype),
            h_x.to(self.head_dtype),
            answer_tokens,
            self.regression_layer,
            self.gating,
            self.reward_transform_matrix,
            self.config.length_objective,
        )
        return torch.cat([s[:, None], r, g, c], dim=-1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Strict: vLLM checks that every parameter was loaded, so a checkpoint missing a head tensor fails here.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
