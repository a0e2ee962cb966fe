# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM for vLLM: an out-of-tree model plugin (entry point `vllm.general_plugins`: `armorm`).

Once installed, vLLM serves ArmoRM checkpoints, this package's and the released `RLHFlow/ArmoRM-Llama3-8B-v0.1`, as
pooling models (`vllm serve CKPT --runner pooling`, `LLM(CKPT, runner="pooling").classify(...)`): each request returns
the reward [score] (what verl and any single-label client read), or, asked with `pooling_params(full_output=True)`,
[status, score, rewards, gating weights, coefficients] (see `vllm_armorm.outputs`); `score_tokens(llm, token_ids,
gating_positions)` reads the full vector for an offline `LLM`. Over HTTP, a server started with
`--io-processor-plugin armorm` (entry point `vllm.io_processor_plugins`) returns the full vector to `/pooling` requests
that send `{"data": {"input": ...}}` (`vllm_armorm.io_processor`).
"""

from .offline import score_tokens
from .outputs import (
    FULL_OUTPUT_KEY,
    GATING_POSITION_KEY,
    ArmoRMOutput,
    ArmoRMRequestError,
    ErrorCode,
    output_size,
    pooling_params,
)


__all__ = [
    "ARCHITECTURES",
    "FULL_OUTPUT_KEY",
    "GATING_POSITION_KEY",
    "ArmoRMOutput",
    "ArmoRMRequestError",
    "ErrorCode",
    "io_processor_plugin",
    "output_size",
    "pooling_params",
    "register",
    "score_tokens",
]

# The `architectures` of this package's checkpoints and of the released RLHFlow checkpoint.
ARCHITECTURES = ("ArmoRMForRewardModeling", "LlamaForRewardModelWithGating")


def register() -> None:
    """Called by vLLM in each of its processes (possibly more than once): register the model and its config."""
    from vllm import ModelRegistry

    import modeling_armorm  # noqa: F401  (registers `ArmoRMConfig` for model_type "armorm" with AutoConfig)

    for architecture in ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            # A string: vLLM imports the model lazily, in the process that builds it.
            ModelRegistry.register_model(architecture, "vllm_armorm.model:ArmoRMRewardModel")


def io_processor_plugin() -> str:
    """Entry point `vllm.io_processor_plugins`: `armorm`, the processor that `--io-processor-plugin armorm` installs
    (the full vector over HTTP `/pooling`, see `vllm_armorm.io_processor`)."""
    return "vllm_armorm.io_processor.ArmoRMIOProcessor"
