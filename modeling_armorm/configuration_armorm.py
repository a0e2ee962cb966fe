# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM configuration: a decoder backbone's config plus the multi-objective and gating heads.

This file is copied next to every saved checkpoint (remote code): it imports only transformers.
"""

from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig


try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.24 (vLLM 0.32 pins 5.19): sub-configs are declared as `sub_configs`
    SubConfigSpec = None


# The roles whose turn headers `turn_header_patterns` may hold: the prompt's roles, then the answer's.
TURN_ROLES = ("system", "user", "tool", "assistant")


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
        gated_objectives (`list[int]`, *optional*):
            The objectives the gating softmax runs over; the others get gating weight 0 by construction (their logits
            are masked out). None: all k (the released checkpoint's math). After decorrelation the verbosity column
            of r T is identically zero, so weight on it could only shrink every score toward zero: models this
            package trains leave it out (arXiv 2406.12845 §3.2 gates the decorrelated rewards r').
        length_objective (`int`, *optional*):
            An objective whose reward is the answer's length, log(1 + n) with n the number of tokens after the
            gating position up to the last real token, computed in the forward from the two positions it reads,
            instead of W h (its row of W is unused). It stands in for verbosity when no verbosity rating can be
            trusted.
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
            Position of the prompt feature relative to the pattern's first token, from 0 to `len(pattern) - 1`: it
            stays inside the pattern (a larger offset would read the answer's tokens).
        gating_token_pattern_text (`str`, *optional*):
            The pattern decoded to text, quoted in error messages (the model holds no tokenizer).
        turn_header_patterns (`dict[str, list[int]]`, *optional*):
            The token ids of each role's turn header in the chat template (`"system"`, `"user"`, `"tool"`,
            `"assistant"`; Llama-3's user header: `[128006, 882, 128007, 271]`), derived by
            `turn_header_patterns_from_tokenizer`. With them, when the model searches the gating pattern in raw token
            ids itself, it refuses a row that is not one prompt and one answer: a system, user or tool header after
            the gating position, or a second assistant header after the last prompt turn (an answer that writes the
            template's markup, which would move h_x into itself). None (checkpoints made before): no such check.
        score_statistics (`dict[str, float]`, *optional*):
            The distribution of the score s on the build's reference answers (both answers of every pair the gating
            network was trained and validated on), recorded by `armorm assemble`: `count`, `mean`, `std` and the
            quantiles `p1`, `p5`, `p50`, `p95`, `p99` (`heads.score_statistics`). s is a gated sum of linear
            rewards, not a probability: these numbers say what a high score is, and `normalize=True` (the pipeline,
            `ArmoRMReward`, `armorm serve --normalize`) returns (s − mean) / std (`heads.normalize_scores`). None:
            not recorded (a converted RLHFlow checkpoint, or one assembled before they were).

    `pad_token_id` lives in `text_config` only; the top-level attribute reads and writes it there, so the value
    that RewardBench reads (`config.pad_token_id`) and the one TRL reads (`config.get_text_config().pad_token_id`)
    can never disagree.
    """

    model_type = "armorm"
    if SubConfigSpec is not None:
        sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    else:
        sub_configs = {"text_config": AutoConfig}

    text_config: dict | PreTrainedConfig | None = None
    num_objectives: int = 19
    objective_names: list[str] | None = None
    verbosity_objective: int | None = None
    gated_objectives: list[int] | None = None
    length_objective: int | None = None
    gating_hidden_dim: int = 1024
    gating_n_hidden: int = 3
    gating_temperature: float = 10.0
    gating_logit_scale_init: float = 100.0
    gating_token_pattern: list[int] | None = None
    gating_token_offset: int = 0
    gating_token_pattern_text: str | None = None
    turn_header_patterns: dict[str, list[int]] | None = None
    score_statistics: dict[str, float] | None = None

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            # What `SubConfigSpec(AutoConfig, model_type="llama")` does on transformers >= 5.24.
            if isinstance(self.text_config, dict):
                text_config = dict(self.text_config)
                self.text_config = CONFIG_MAPPING[text_config.pop("model_type", "llama")](**text_config)
            elif self.text_config is None:
                self.text_config = CONFIG_MAPPING["llama"]()
        # A reward model has one output, the score: TRL loads reward models with `num_labels=1`, and
        # `problem_type="regression"` makes the text-classification pipeline return it raw (not a sigmoid).
        kwargs.setdefault("num_labels", 1)
        kwargs.setdefault("problem_type", "regression")
        super().__post_init__(**kwargs)
        self._validate_heads()

    def _validate_heads(self) -> None:
        k = self.num_objectives
        if self.objective_names is not None and len(self.objective_names) != k:
            raise ValueError(
                f"`objective_names` has {len(self.objective_names)} names but `num_objectives` is {k}; give one "
                "name per objective."
            )
        for name in ("verbosity_objective", "length_objective"):
            index = getattr(self, name)
            if index is not None and not 0 <= index < k:
                raise ValueError(f"`{name}` ({index}) must index one of the {k} objectives.")
        if self.gated_objectives is not None:
            gated = list(self.gated_objectives)
            if not gated or len(set(gated)) != len(gated) or not all(0 <= i < k for i in gated):
                raise ValueError(
                    f"`gated_objectives` ({gated}) must list distinct indices of the {k} objectives, at least one."
                )
        # `not 0 < x < inf` is also true for NaN: a JSON `NaN` or `Infinity` in config.json is refused by name.
        if not 0 < self.gating_temperature < float("inf"):
            raise ValueError(
                f"`gating_temperature` must be > 0 and finite, got {self.gating_temperature}: the softmax "
                "divides by it."
            )
        if not abs(self.gating_logit_scale_init) < float("inf"):
            raise ValueError(
                f"`gating_logit_scale_init` (β's initial value) must be finite, got {self.gating_logit_scale_init}."
            )
        if self.gating_token_offset < 0:
            raise ValueError(
                f"`gating_token_offset` must be >= 0, got {self.gating_token_offset}: the prompt feature is read at "
                "the gating pattern's first token plus the offset, inside the pattern."
            )
        vocab_size = getattr(self.text_config, "vocab_size", None)
        pattern = self.gating_token_pattern
        if pattern:
            outside = [i for i in pattern if not 0 <= i < (vocab_size if vocab_size is not None else i + 1)]
            if outside:
                raise ValueError(
                    f"`gating_token_pattern` holds ids {outside} outside the backbone's vocabulary ({vocab_size}); "
                    "derive it from the model's own tokenizer (`gating_pattern_from_tokenizer`)."
                )
            if self.gating_token_offset >= len(pattern):
                raise ValueError(
                    f"`gating_token_offset` ({self.gating_token_offset}) reads past the prompt: the pattern has "
                    f"{len(pattern)} tokens, so the offset must be below {len(pattern)}."
                )
        for role, header in (self.turn_header_patterns or {}).items():
            outside = [i for i in header or [] if not 0 <= i < (vocab_size if vocab_size is not None else i + 1)]
            if role not in TURN_ROLES or not header or outside:
                raise ValueError(
                    f"`turn_header_patterns` maps {role!r} to {header}: give the non-empty token ids of the roles "
                    f"{list(TURN_ROLES)} within the backbone's vocabulary ({vocab_size}), as "
                    "`turn_header_patterns_from_tokenizer(tokenizer)` derives them."
                )

        statistics = self.score_statistics
        if statistics is not None and not (
            isinstance(statistics, dict)
            and all(isinstance(statistics.get(key), (int, float)) for key in ("mean", "std"))
            and abs(statistics["mean"]) < float("inf")
            and 0 < statistics["std"] < float("inf")
        ):
            raise ValueError(
                f"`score_statistics` ({statistics!r:.200}) must hold a finite `mean` and a finite `std` > 0 (the "
                "scale `normalize=True` divides by), as `armorm assemble` records them; set it to None otherwise."
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
