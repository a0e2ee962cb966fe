# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The plugin's settings, one home: set each with vLLM's `--hf-overrides '{"armorm_<name>": value}'` (or
`LLM(..., hf_overrides={...})`), which reaches every worker with the model's config."""

import dataclasses
from dataclasses import dataclass, field


__all__ = ["ArmoRMVllmSettings"]


@dataclass(frozen=True, kw_only=True)
class ArmoRMVllmSettings:
    prompt_feature_entries: int = field(
        default=16384,
        metadata={
            "help": "Prompt hidden states kept for prefix-cache hits (one row of the model's hidden size each, "
            "allocated with the weights: 128 MiB for a bfloat16 d = 4096). A request whose gating token was cached "
            "and evicted from here gets status 3 and is resubmitted without the prefix cache."
        },
    )

    @classmethod
    def from_hf_config(cls, hf_config) -> "ArmoRMVllmSettings":
        """The settings given as `armorm_<name>` attributes of the model's config (by `hf_overrides`)."""
        given = {f.name: getattr(hf_config, f"armorm_{f.name}", None) for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in given.items() if value is not None})
