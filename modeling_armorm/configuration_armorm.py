# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM configuration: a decoder backbone's config plus the multi-objective and gating heads.

This file is copied next to every saved checkpoint (remote code): it imports only transformers.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class ArmoRMConfig(PreTrainedConfig):
    r"""
    Configuration of [`ArmoRMForRewardModeling`] (arXiv 2406.12845).

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            The backbone's configuration: any decoder-only model that `AutoModel` builds (Llama, Qwen2, Mistral,
            Gemma-2, SmolLM, ...). Defaults to a Llama config.
        num_objectives (`int`, defaults to 19):
            k, the number of rating objectives: rows of the regression layer and outputs of the gating network.
        objective_names (`list[str]`, *optional*):
            A name for each objective, in the order of the regression layer's rows.
        verbosity_objective (`int`, *optional*):
            Index of the verbosity objective v whose reward the others were decorrelated from (4 in the release).
        gating_hidden_dim (`int`, defaults to 1024):
            Width of the gating MLP's hidden layers (the paper's value).
        gating_n_hidden (`int`, defaults to 3):
            Number of hidden ReLU layers of the gating MLP (the paper's value).
        gating_temperature (`float`, defaults to 10):
            Fixed softmax temperature of the gating network (the paper's value).
        gating_logit_scale_init (`float`, defaults to 100):
            Initial value of the learnable scale β of the gating output (the paper's value).
        gating_token_pattern (`list[int]`, *optional*):
            Token ids that separate the prompt from the final assistant answer; the prompt feature is read at its
            last occurrence (plus `gating_token_offset`). Llama-3: `[128009, 128006, 78191, 128007, 271]`.
            `gating_pattern_from_tokenizer` derives it from any chat template.
        gating_token_offset (`int`, defaults to 0):
            Position of the prompt feature relative to the pattern's first token.
        gating_token_pattern_text (`str`, *optional*):
            The pattern decoded to text, quoted in error messages (the model holds no tokenizer).

    `pad_token_id` lives in `text_config` only; the top-level attribute reads and writes it there, so the value
    that RewardBench reads (`config.pad_token_id`) and the one TRL reads (`config.get_text_config().pad_token_id`)
    can never disagree.
    """

    model_type = "armorm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_objectives: int = 19
    objective_names: list[str] | None = None
    verbosity_objective: int | None = None
    gating_hidden_dim: int = 1024
    gating_n_hidden: int = 3
    gating_temperature: float = 10.0
    gating_logit_scale_init: float = 100.0
    gating_token_pattern: list[int] | None = None
    gating_token_offset: int = 0
    gating_token_pattern_text: str | None = None

    def __post_init__(self, **kwargs):
        # A reward model has one output, the score: TRL loads reward models with `num_labels=1`.
        kwargs.setdefault("num_labels", 1)
        super().__post_init__(**kwargs)
        if self.objective_names is not None and len(self.objective_names) != self.num_objectives:
            raise ValueError(
                f"`objective_names` has {len(self.objective_names)} names but `num_objectives` is "
                f"{self.num_objectives}; give one name per objective."
            )
        if self.verbosity_objective is not None and not 0 <= self.verbosity_objective < self.num_objectives:
            raise ValueError(
                f"`verbosity_objective` ({self.verbosity_objective}) must index one of the "
                f"{self.num_objectives} objectives."
            )

    @property
    def pad_token_id(self) -> int | None:
        return getattr(self.text_config, "pad_token_id", None)

    @pad_token_id.setter
    def pad_token_id(self, value: int | None):
        self.text_config.pad_token_id = value

    def to_dict(self):
        output = super().to_dict()
        # Written at the top level too, for tools that read config.json directly; loading routes it back to
        # `text_config` through the property above.
        output["pad_token_id"] = self.pad_token_id
        return output

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.text_config


__all__ = ["ArmoRMConfig"]
