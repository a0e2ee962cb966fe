# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM as verl's reward: `compute_score` functions for verl's custom-reward interface that score through a running
`armorm serve`.

    armorm serve --model CKPT --port 8000                    # on the reward host (`--backend vllm` on a GPU)
    python -m verl.trainer.main_ppo ... \\
        reward_model.enable=False \\
        custom_reward_function.path=pkg://serving.verl_reward \\
        custom_reward_function.name=compute_score

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)` once per response (its `naive`
reward manager, and the reward loop's), or `compute_score_batch(data_sources, solution_strs, ground_truths,
extra_infos)` once per batch (`reward_model.reward_manager=batch`, name `compute_score_batch`). Each posts the
conversations to the server's `/score` as messages, the prompt from `extra_info["prompt"]` and the response as the
assistant's text, so the server renders them with the reward model's chat template, reads h_x where the rendering
puts the assistant header and tokenizes the response as text: markup that the policy writes cannot move h_x. The
result is `{"score": s, <objective>: r_j, ...}`: verl rewards s and logs every objective's reward r_j.

The prompt: verl passes `extra_info` (not its `prompt` column) to the function, so the data preprocessing must copy
the prompt there, as a message list (`[{"role": "user", "content": ...}]`, verl's own prompt layout) or a string (one
user turn): `"extra_info": {"prompt": prompt, ...}`. The server: `ARMORM_SERVE_URL` (default
`http://127.0.0.1:8000`), or `custom_reward_function.reward_kwargs.url=...`, which verl passes as `url`.

Standard library only: verl may also load this file by its path (`custom_reward_function.path=/abs/path/to/
serving/verl_reward.py`, for a verl without `pkg://` paths), with none of the package's modules importable.
"""

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = [
    "DEFAULT_URL",
    "PROMPT_KEY",
    "TIMEOUT_S",
    "URL_ENV",
    "ArmoRMServeError",
    "compute_score",
    "compute_score_batch",
]

URL_ENV = "ARMORM_SERVE_URL"  # the environment variable that names the server
DEFAULT_URL = "http://127.0.0.1:8000"  # `armorm serve`'s default host and port
PROMPT_KEY = "prompt"  # the `extra_info` key that holds the prompt
TIMEOUT_S = 600.0  # one `/score` request; a batch of long conversations on a busy server can take minutes


class ArmoRMServeError(RuntimeError):
    """The server refused a request or could not be reached; the message says which and why."""


def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: Mapping | None = None,
    *,
    url: str | None = None,
    timeout: float = TIMEOUT_S,
    **unused: Any,
) -> dict[str, float]:
    """The reward of one response: `{"score": s, <objective>: r_j, ...}`. `data_source` and `ground_truth` are
    unused (a reward model needs no reference answer); so are the keyword arguments verl's reward loop adds
    (`reward_router_address`, `reward_model_tokenizer`)."""
    (result,) = compute_score_batch(
        [data_source], [solution_str], [ground_truth], [extra_info], url=url, timeout=timeout
    )
    return result


def compute_score_batch(
    data_sources: Sequence,
    solution_strs: Sequence[str],
    ground_truths: Sequence | None = None,
    extra_infos: Sequence[Mapping | None] | None = None,
    *,
    url: str | None = None,
    timeout: float = TIMEOUT_S,
    **unused: Any,
) -> list[dict[str, float]]:
    """The rewards of a batch of responses, in one `/score` request (verl's `batch` reward manager)."""
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    if len(extra_infos) != len(solution_strs):
        raise ValueError(f"Got {len(solution_strs)} responses but {len(extra_infos)} `extra_info` entries.")
    prompts = [prompt_messages(info, i) for i, info in enumerate(extra_infos)]
    for i, response in enumerate(solution_strs):
        if not isinstance(response, str):
            raise TypeError(f"response {i}: expected the decoded response text, got {type(response).__name__}.")
    answer = post(url, "/score", {"prompts": prompts, "completions": list(solution_strs)}, timeout)
    names, scores, rewards = answer["objective_names"], answer["scores"], answer["rewards"]
    results = []
    for i, (score, row) in enumerate(zip(scores, rewards)):
        if score is None or not math.isfinite(score):
            raise ArmoRMServeError(f"response {i}: the server returned a non-finite score ({score}).")
        results.append({**dict(zip(names, row)), "score": score})
    return results


def prompt_messages(extra_info: Mapping | None, i: int) -> list[dict[str, str]]:
    """The prompt of response `i` as messages: `extra_info[PROMPT_KEY]`, a message list or a string (one user turn)."""
    prompt = (extra_info or {}).get(PROMPT_KEY)
    if prompt is None:
        keys = sorted(extra_info or {})
        raise ValueError(
            f"response {i}: `extra_info` has no {PROMPT_KEY!r} (it has {keys}), so the reward model cannot see what "
            f"the response answers. Copy the prompt there in the data preprocessing: "
            f'`"extra_info": {{"{PROMPT_KEY}": prompt, ...}}` (the message list of the `prompt` column, or a string).'
        )
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    # Parquet rows may hold the list as a NumPy array and each message as a mapping: plain JSON here.
    try:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    except (TypeError, KeyError) as error:
        raise ValueError(
            f"response {i}: `extra_info[{PROMPT_KEY!r}]` must be a string or a list of messages with `role` and "
            f"`content`, got {prompt!r:.200}."
        ) from error
    if not messages:
        raise ValueError(f"response {i}: `extra_info[{PROMPT_KEY!r}]` is an empty message list.")
    return messages


def server_url(url: str | None = None) -> str:
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def post(url: str | None, route: str, payload: dict, timeout: float) -> dict:
    """POST `payload` to the server; its JSON answer, or an `ArmoRMServeError` with the server's own message."""
    base = server_url(url)
    request = urllib.request.Request(
        base + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        try:
            body = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            pass
        raise ArmoRMServeError(f"{base}{route} answered HTTP {error.code}: {body}") from None
    except (urllib.error.URLError, OSError) as error:
        raise ArmoRMServeError(
            f"cannot reach `armorm serve` at {base} ({error}): start it (`armorm serve --model CKPT`) or point "
            f"`{URL_ENV}` (or `custom_reward_function.reward_kwargs.url`) at it."
        ) from None
