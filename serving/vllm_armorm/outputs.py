# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""What one ArmoRM request returns through vLLM's pooling API, and how to ask for it.

vLLM's pooling outputs are one float vector per request (`LLM.classify(...)[i].outputs.probs`, the `probs` of the
OpenAI server's `/classify`, the `data` of `/pooling`). The ArmoRM pooler writes one of two layouts:

* the reward, for every client (the default): `[score]`, one value, so that a client reading `probs[-1]` (verl's
  reward loop) and one reading `probs[0]` (a single-label classifier) both read the score s, raw (the pooler applies
  no activation, whatever `use_activation` says). A request that cannot be scored gets `[NaN]`, never a number: the
  OpenAI server cannot write NaN in JSON and answers that HTTP request with an error (400) instead, while the other
  requests it serves are scored; offline, read why with the full layout.
* the full vector, when the request asks for it with `PoolingParams(extra_kwargs={FULL_OUTPUT_KEY: True})`
  (`pooling_params(..., full_output=True)`, as `score_tokens` and `armorm serve --backend vllm` do):

      [status, score, r_1 … r_k, g_1 … g_k, c_1 … c_k]            (length 2 + 3k)

  status 0 = scored; any other value is an `ErrorCode`, and then every other entry is 0. score s = g · (r T); r = W h,
  the k raw rewards; g = β softmax(MLP(h_x)/τ), the gating weights; c = g Tᵀ, the weight of each raw reward in the
  score (s = c · r).

vLLM 0.32 gives a pooler the same `PoolingParams` for `/classify` and a plain `/pooling` request (the task of both is
the server's one pooling task, "classify", and neither request carries `extra_kwargs`), so both return the reward; the
full vector is for clients that build their own `PoolingParams` (`LLM.classify`, `LLM.encode`, `AsyncLLM.encode`) and,
over HTTP, for `/pooling` requests with a `data` field on a server started with `--io-processor-plugin armorm`
(`vllm_armorm.io_processor`).
"""

from dataclasses import dataclass
from enum import IntEnum


__all__ = [
    "GATING_POSITION_KEY",
    "ArmoRMOutput",
    "ArmoRMRequestError",
    "ErrorCode",
    "FULL_OUTPUT_KEY",
    "output_size",
    "pooling_params",
]

# `PoolingParams.extra_kwargs` key of the position where h_x is read, when the client knows it from the rendering.
GATING_POSITION_KEY = "armorm_gating_position"
# `PoolingParams.extra_kwargs` key that asks for the full vector [status, s, r, g, c] instead of the reward [s] alone.
FULL_OUTPUT_KEY = "armorm_full_output"


class ErrorCode(IntEnum):
    OK = 0
    NO_GATING_PATTERN = 1
    GATING_POSITION_OUTSIDE_PROMPT = 2
    PROMPT_FEATURE_EVICTED = 3
    NOT_ONE_PROMPT_AND_ONE_ANSWER = 4


MESSAGES = {
    ErrorCode.NO_GATING_PATTERN: (
        "the prompt holds no gating pattern (the chat template's assistant header), so the prompt feature h_x cannot "
        "be located: render the conversation with the reward model's chat template, ending with the assistant's "
        f"answer, or pass the position as `PoolingParams(extra_kwargs={{{GATING_POSITION_KEY!r}: position}})`"
    ),
    ErrorCode.GATING_POSITION_OUTSIDE_PROMPT: (
        f"`{GATING_POSITION_KEY}` is not the index of a token of the prompt: give 0 <= position < the prompt's length"
    ),
    ErrorCode.PROMPT_FEATURE_EVICTED: (
        "the prompt's gating token was served from vLLM's prefix cache and its hidden state is no longer held by the "
        "plugin's prompt-feature cache: send the request again with "
        "`PoolingParams(skip_reading_prefix_cache=True)` (`pooling_params(..., skip_prefix_cache=True)`), or raise "
        "`--hf-overrides '{\"armorm_prompt_feature_entries\": N}'`"
    ),
    ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER: (
        "the prompt's tokens are not one prompt and one answer: a system, user or tool header follows the last "
        "assistant header (the conversation does not end with the assistant's answer), or a second assistant header "
        "follows the last prompt turn (an answer that writes the chat template's markup, which would move h_x into "
        "itself). Raw token ids cannot tell the template's markup from markup an answer wrote: score through "
        "`modeling_armorm.ArmoRMReward` or `armorm serve`, which render each conversation and keep an answer's markup "
        "as text, or pass the gating position from the rendering as "
        f"`PoolingParams(extra_kwargs={{{GATING_POSITION_KEY!r}: position}})`"
    ),
}


def output_size(num_objectives: int) -> int:
    return 2 + 3 * num_objectives


class ArmoRMRequestError(ValueError):
    """A request the pooler could not score; `code` says why (see `ErrorCode`)."""

    def __init__(self, code: ErrorCode, where: str = "the request"):
        self.code = ErrorCode(code)
        super().__init__(f"{where}: {MESSAGES[self.code]}")


@dataclass
class ArmoRMOutput:
    """One scored request: `score`, and the k `rewards` r, `gating_output` g and `coefficients` c = g Tᵀ."""

    score: float
    rewards: list[float]
    gating_output: list[float]
    coefficients: list[float]

    @classmethod
    def from_vector(cls, vector, where: str = "the request") -> "ArmoRMOutput":
        """Read the pooler's vector (a tensor or a list); raises `ArmoRMRequestError` for a request it refused."""
        values = [float(v) for v in (vector.tolist() if hasattr(vector, "tolist") else vector)]
        k, extra = divmod(len(values) - 2, 3)
        if extra or k < 1:
            raise ValueError(f"{where}: expected an ArmoRM vector of 2 + 3k values, got {len(values)}.")
        if values[0] != ErrorCode.OK:
            raise ArmoRMRequestError(ErrorCode(int(values[0])), where)
        return cls(values[1], values[2 : 2 + k], values[2 + k : 2 + 2 * k], values[2 + 2 * k :])


def pooling_params(gating_position: int | None = None, skip_prefix_cache: bool = False, full_output: bool = False):
    """`PoolingParams` of an ArmoRM request: the `classify` task, the gating position when the client knows it (from
    the rendering, as `modeling_armorm.scoring.ChatEncoder` gives it), whether to bypass the prefix cache, and whether
    to return the full vector [status, s, r, g, c] (`ArmoRMOutput.from_vector` reads it) instead of [s]."""
    from vllm import PoolingParams

    extra = {}
    if gating_position is not None:
        extra[GATING_POSITION_KEY] = int(gating_position)
    if full_output:
        extra[FULL_OUTPUT_KEY] = True
    return PoolingParams(
        task="classify", extra_kwargs=extra or None, skip_reading_prefix_cache=True if skip_prefix_cache else None
    )
