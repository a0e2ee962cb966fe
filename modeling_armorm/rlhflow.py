# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The released `RLHFlow/ArmoRM-Llama3-8B-v0.1` checkpoint's config, read as an `ArmoRMConfig`.

The release ships a flat Llama `config.json` extended with `num_objectives` and `gating_*` keys. Its weights carry
this package's state-dict names, so its config is all that differs: `rlhflow_config` turns it into an `ArmoRMConfig`
(the backbone's keys become `text_config`, the release's 19 objective names and verbosity = 4, the Llama-3 gating
pattern). `armorm convert-rlhflow` writes a checkpoint with it; the vLLM plugin and `armorm serve --backend vllm`
read the release as it is through it.
"""

from transformers import AutoConfig

from .chat_template import gating_pattern_from_tokenizer, turn_header_patterns_from_tokenizer
from .configuration_armorm import ArmoRMConfig


__all__ = [
    "LLAMA3_GATING_PATTERN",
    "LLAMA3_TURN_HEADERS",
    "RLHFLOW_LAYOUT",
    "RLHFLOW_OBJECTIVES",
    "RLHFLOW_VERBOSITY",
    "rlhflow_config",
]

# The release's 19 objectives, in the order of its regression layer (arXiv 2406.12845 Appendix A); verbosity is
# helpsteer-verbosity.
RLHFLOW_OBJECTIVES = [
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
]
RLHFLOW_VERBOSITY = "helpsteer-verbosity"
# <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n, the pattern the release's remote code searched for.
LLAMA3_GATING_PATTERN = [128009, 128006, 78191, 128007, 271]
# <|start_header_id|>{role}<|end_header_id|>\n\n: Llama-3's turn headers (`turn_header_patterns_from_tokenizer`).
LLAMA3_TURN_HEADERS = {
    "assistant": [128006, 78191, 128007, 271],
    "system": [128006, 9125, 128007, 271],
    "user": [128006, 882, 128007, 271],
    "tool": [128006, 14506, 128007, 271],
}
_HEAD_KEYS = ("num_objectives", "gating_temperature", "gating_hidden_dim", "gating_n_hidden")
RLHFLOW_LAYOUT = (
    "the released RLHFlow ArmoRM layout: a flat decoder `config.json` (e.g. model_type 'llama') with "
    "`num_objectives` and `gating_temperature`/`gating_hidden_dim`/`gating_n_hidden` keys, and safetensors weights "
    "named `model.*`, `regression_layer.weight`, `gating.layers.{i}.weight|bias`, `gating.logit_scale`, "
    "`reward_transform_matrix`"
)


def rlhflow_config(src_config: dict, tokenizer=None) -> ArmoRMConfig:
    """`ArmoRMConfig` from the release's flat config: the backbone keys become `text_config`."""
    if src_config.get("model_type") == ArmoRMConfig.model_type:
        raise ValueError("This is already an ArmoRM checkpoint of this package: load it with `from_pretrained`.")
    missing = [key for key in _HEAD_KEYS if key not in src_config]
    if "model_type" not in src_config or missing:
        raise ValueError(f"`config.json` lacks {missing or ['model_type']}; expected {RLHFLOW_LAYOUT}.")
    flat = {k: v for k, v in src_config.items() if k not in ("auto_map", "architectures", "id2label", "label2id")}
    num_objectives = flat.pop("num_objectives")
    heads = {
        "gating_temperature": flat.pop("gating_temperature"),
        "gating_hidden_dim": flat.pop("gating_hidden_dim"),
        "gating_n_hidden": flat.pop("gating_n_hidden"),
    }
    text_config = AutoConfig.for_model(**flat)
    if num_objectives == len(RLHFLOW_OBJECTIVES):
        names = {
            "objective_names": RLHFLOW_OBJECTIVES,
            "verbosity_objective": RLHFLOW_OBJECTIVES.index(RLHFLOW_VERBOSITY),
        }
    else:
        names = {}
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        pattern = gating_pattern_from_tokenizer(tokenizer).config_kwargs()
        pattern["turn_header_patterns"] = turn_header_patterns_from_tokenizer(tokenizer)
        if pattern["gating_token_pattern"] != LLAMA3_GATING_PATTERN:
            raise ValueError(
                f"The tokenizer's chat template gives the gating pattern {pattern['gating_token_pattern']}, but the "
                f"released model reads its prompt feature at {LLAMA3_GATING_PATTERN} (Llama-3). Convert with the "
                "checkpoint's own Llama-3 tokenizer."
            )
    else:
        pattern = {
            "gating_token_pattern": LLAMA3_GATING_PATTERN,
            "gating_token_offset": 0,
            "turn_header_patterns": LLAMA3_TURN_HEADERS,
        }
    return ArmoRMConfig(text_config=text_config, num_objectives=num_objectives, **heads, **names, **pattern)
