# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM as a reward function for TRL's online trainers (GRPO, RLOO, OnlineDPO, AsyncGRPO).

The model itself is already a TRL reward model: `reward_funcs=[model]` or `reward_funcs=["path"]` works because
the score is `.logits[:, 0]`, the last real token comes from the attention mask and the gating position is found
in the tokens. That path has three limits that this callable lifts:

* The gating position of raw tokens is the last occurrence of the template's assistant header, which a completion
  can write itself (`…<|im_end|>\n<|im_start|>assistant\n…`) to move h_x into its own text and choose its own
  gating weights. `ArmoRMReward` scores through `modeling_armorm.scoring`: the position comes from the rendering and
  markup in a completion is never read as special tokens. Under RL, where the policy writes the completions, use it.
* TRL scores plain-text (non-conversational) prompts as `prompt + completion` without any chat template, so the
  gating pattern is absent and the model raises. `ArmoRMReward` renders them as a user turn + assistant answer.
* TRL logs one number per reward model. `ArmoRMReward` also logs each objective's mean reward r_i and the mean
  gating weights g_i / Σ g (through the `log_metric` / `log_extra` callbacks TRL passes as keyword arguments), and
  can return a single objective (or the sum of a subset) for TRL's weighted multi-reward aggregation.

With `url=`, the scoring runs in an `armorm serve` server (vLLM or transformers, on its own GPUs) instead of the
trainer's process; the server encodes each (prompt, completion) with the same rule (`encode_prompt_completion`).
"""

import json
import math
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .heads import normalize_scores
from .modeling_armorm import ArmoRMForRewardModeling, NonFiniteScoreError
from .scoring import (
    ChatEncoder,
    EncodedConversation,
    ScoreOutput,
    model_gating_pattern,
    objective_names,
    pad_token_id,
    score_encoded,
)
from .settings import DEFAULT_BATCH_SIZE, fit_dtype, resolve_device


logger = logging.get_logger(__name__)
Message = dict[str, str]


def _as_messages(turn: str | list[Message], role: str) -> list[Message]:
    # TRL's conversational format: a list of {"role", "content"} dicts; its standard format: a plain string.
    return [{"role": role, "content": turn}] if isinstance(turn, str) else list(turn)


def encode_prompt_completion(
    encoder: ChatEncoder, prompt: str | list[Message], completion: str | list[Message], where: str = "the completion"
) -> EncodedConversation:
    """The tokens and gating position of one (prompt, completion) as TRL passes them (message lists or strings).

    A plain prompt is always a user turn and a plain completion the assistant's answer, whatever text they hold
    (a user may ask about ChatML's markup): both are rendered with the template, their markup kept as text. A prompt
    rendered already goes to `ChatEncoder.encode_rendered`, which its caller chooses knowing what it holds."""
    if not isinstance(completion, (str, list, tuple)) or not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"{where}: the prompt and the completion must be strings or message lists.")
    messages = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
    return encoder.encode(messages, where)


# The client of `armorm serve` is these standard-library lines beside `ArmoRMReward`, not a module beside the server:
# `modeling_armorm` stands below `serving` and may not import it, and a trainer that scores through a server should
# not need the server's dependencies (FastAPI, uvicorn, vLLM).
def _request_json(url: str, payload: dict | None, timeout: float) -> dict:
    """GET `url`, or POST `payload` to it as JSON; the JSON answer, or an error that names the fix."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})  # POST with data
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # the server answered: a 422 names the row and the fix
        detail = error.read().decode(errors="replace")[:2000]
        if error.code >= 500:  # a fault of the model or the server (a non-finite score), not of the request
            raise RuntimeError(f"The reward server failed on {url} ({error.code}): {detail}") from None
        raise ValueError(f"The reward server refused {url} ({error.code}): {detail}") from None
    except OSError as error:  # unreachable, refused or timed out
        raise ConnectionError(
            f"No answer from the reward server at {url} ({error}): start it with `armorm serve --model CKPT --port N` "
            "and pass `url='http://host:N'`."
        ) from None


class ArmoRMReward:
    """A picklable TRL reward function (`__call__(prompts, completions, **kwargs) -> list[float]`) backed by ArmoRM.

    Args:
        model_or_path (`ArmoRMForRewardModeling` or `str`, *optional*):
            The reward model, or the folder / Hub id of a checkpoint. A path is loaded on the first call (and again
            after unpickling, so the function can be sent to another process without its weights), in its saved dtype
            but float32 for a bfloat16 one on a CPU without native bfloat16 (`settings.resolve_dtype`). Not with `url`.
        objectives (`list[str | int]`, *optional*):
            Return the sum of these objectives' raw rewards r_i (names from `config.objective_names`, or indices)
            instead of the gated score s. One objective per instance, combined with `reward_weights`, gives TRL's
            weighted multi-reward aggregation. Raw rewards are not verbosity-decorrelated (only the score uses T).
        batch_size (`int`, defaults to 8):
            Conversations per forward pass; they are sorted by length first so each batch carries little padding.
        tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*):
            The reward model's tokenizer (its chat template defines the gating pattern). Loaded from
            `model_or_path` (or `model.name_or_path`) when not given.
        device (`str` or `torch.device`, *optional*):
            Where to run the model. Defaults to the given model's device, or CUDA when available for a path.
        url (`str`, *optional*):
            Score through an `armorm serve` server at this address (`http://host:port`) instead of a local model:
            each call posts the prompts and completions to its `/score` endpoint. The objective names are read from
            its `/info` on the first call.
        timeout (`float`, defaults to 600):
            Seconds to wait for the server's answer to one call (with `url`).
        max_batch_tokens (`int`, *optional*):
            Padded tokens per forward pass (rows × the longest row): a batch holds at most `batch_size` rows and no
            more than fit this budget (a longer conversation runs alone). Default on a CPU: 4096 packed (`packing`),
            1024 padded; rows only on a GPU. With `url`, the server's own `--max-batch-tokens` applies.
        normalize (`bool`, defaults to `False`):
            Return each score as z = (s − mean) / std, with the mean and standard deviation of the scores of the
            checkpoint's reference answers (`config.score_statistics`, or the server's `/info`; a checkpoint without
            them raises a `ValueError` on the first call, saying how to record them). Only the returned score is
            normalized: the logged rewards and gating weights, and `score`'s outputs, stay as the model gives them.
            Not with `objectives` (raw rewards). A server started with `--normalize` returns normalized scores
            already: pass `normalize=True` for it (`False` is refused, rather than mistaking them for raw ones).

    Prompts and completions may be conversational (message lists) or plain strings. A plain prompt is always
    rendered with the reward model's chat template as a user turn, followed by the completion as the assistant's
    answer; markup in any message's text stays text (`encode_prompt_completion`).

    A completion that cannot be scored (text that is no UTF-8, a message with `tool_calls`, more tokens than the
    backbone's positions, a row the server refuses) never fails the others: calling the function gives it `None`,
    which TRL takes as "no reward from this function" (with every function None, GRPO gives it no advantage), and
    logs a warning naming the row and the reason. `score` raises a `ValueError` naming the row instead.

    Building the function reads nothing and sends no request: the checkpoint (or the server's `/info`) is read on the
    first call, where an unknown objective fails before anything is scored.
    """

    def __init__(
        self,
        model_or_path: ArmoRMForRewardModeling | str | os.PathLike | None = None,
        objectives: Sequence[str | int] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        tokenizer=None,
        device: str | torch.device | None = None,
        url: str | None = None,
        timeout: float = 600.0,
        max_batch_tokens: int | None = None,
        normalize: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"`max_batch_tokens` must be at least 1, got {max_batch_tokens}.")
        if (model_or_path is None) == (url is None):
            raise ValueError(
                "Give either `model_or_path` (score in this process) or `url` (an `armorm serve` server)."
            )
        self.model_or_path = model_or_path
        self.objectives = list(objectives) if objectives is not None else None
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer = tokenizer
        self.device = device
        self.url = url.rstrip("/") if url is not None else None
        self.timeout = timeout
        if self.objectives == []:
            raise ValueError("`objectives` is empty; pass None for the gated score, or at least one objective.")
        if normalize and self.objectives is not None:
            raise ValueError(
                "`normalize` applies to the gated score, and `objectives` returns raw rewards: pass one or the other."
            )
        self.normalize = normalize
        # TRL names each reward function by its `__name__` (`rewards/<name>/mean`) when it builds the trainer: the
        # objectives as given, so that naming needs no checkpoint.
        self.__name__ = "armorm" + (f"[{'+'.join(map(str, self.objectives))}]" if self.objectives else "")
        self.objective_names_ = None  # the checkpoint's, read on the first call
        self.objective_indices_ = None
        self.score_statistics_ = None  # `config.score_statistics` (or the server's), read on the first call
        self.server_normalizes_ = False  # a server started with `--normalize` returns z already
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._encoder = None

    def _resolve_objectives(self) -> None:
        """Read the objective names (the server's `/info`, or the model's config) and find `objectives` among them."""
        if self.objective_names_ is not None:
            return
        if self.url is not None:
            info = _request_json(self.url + "/info", None, self.timeout)
            names, statistics = list(info["objective_names"]), info.get("score_statistics")
            self.server_normalizes_ = bool(info.get("normalize"))
            if self.server_normalizes_ and not self.normalize:
                raise ValueError(
                    f"The reward server at {self.url} normalizes its scores (`armorm serve --normalize`): pass "
                    "`normalize=True`, or restart it without `--normalize` for raw scores."
                )
        else:
            config = self._load()[0].config
            names, statistics = objective_names(config), config.score_statistics
        if self.normalize and not self.server_normalizes_:
            normalize_scores(0.0, statistics)  # a checkpoint without statistics fails before anything is scored
        self.score_statistics_ = statistics
        self.objective_indices_ = self._objective_indices(self.objectives, names)
        self.objective_names_ = names  # last: other threads read it as "resolved"

    @staticmethod
    def _objective_indices(objectives: list[str | int] | None, names: list[str]) -> list[int] | None:
        if objectives is None:
            return None
        indices = []
        for objective in objectives:
            if isinstance(objective, int) and 0 <= objective < len(names):
                indices.append(objective)
            elif isinstance(objective, str) and objective in names:
                indices.append(names.index(objective))
            else:
                raise ValueError(f"Unknown objective {objective!r} in `objectives`; choose names among {names}.")
        return indices

    # Pickling: drop the loaded model and tokenizer (and the lock); `_load` rebuilds them on the next call.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_lock=None, _model=None, _tokenizer=None, _encoder=None)
        return state

    def __setstate__(self, state: dict):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:  # AsyncGRPO calls reward functions from worker threads
            if self._model is not None:
                return self._model, self._tokenizer
            model = self.model_or_path
            if not isinstance(model, PreTrainedModel):
                device = resolve_device(self.device)
                model = fit_dtype(ArmoRMForRewardModeling.from_pretrained(model), "auto", device).to(device).eval()
            elif self.device is not None:
                model = model.to(self.device)
            tokenizer = self.tokenizer
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = AutoTokenizer.from_pretrained(tokenizer or model.name_or_path)
            self._encoder = ChatEncoder(tokenizer, model_gating_pattern(model, tokenizer))
            self._model, self._tokenizer = model, tokenizer
            return model, tokenizer

    def encode(self, prompt: str | list[Message], completion: str | list[Message], where: str = "the completion"):
        """The tokens the reward model scores and their gating position (`modeling_armorm.scoring.ChatEncoder`)."""
        self._load()
        return encode_prompt_completion(self._encoder, prompt, completion, where)

    def score(self, prompts: list, completions: list) -> ScoreOutput:
        """Score each (prompt, completion): `score` (n,), `rewards`, `gating_output`, `coefficients` (n, k), on the
        CPU, in the callers' order."""
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; pass one of each.")
        self._resolve_objectives()
        if self.url is not None:
            payload = {"prompts": list(prompts), "completions": list(completions)}
            answer = _request_json(self.url + "/score", payload, self.timeout)
            k = len(self.objective_names_)
            heads = {
                key: torch.tensor(answer[key], dtype=torch.float32).reshape(-1, k)
                for key in ("rewards", "gating_output", "coefficients")
            }
            return ScoreOutput(score=torch.tensor(answer["scores"], dtype=torch.float32), **heads)
        model, tokenizer = self._load()
        encoded = [self.encode(p, c, where=f"completion {i}") for i, (p, c) in enumerate(zip(prompts, completions))]
        return score_encoded(
            model, encoded, self.batch_size, pad_token_id(tokenizer), max_batch_tokens=self.max_batch_tokens
        )

    def _score_scorable(self, prompts: list, completions: list) -> tuple[ScoreOutput, list[int], dict[int, str]]:
        """`score` over the rows that can be scored: their outputs, their indices, and the others' reasons."""
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; pass one of each.")
        pairs = list(zip(prompts, completions))
        self._resolve_objectives()  # an unknown objective fails the call, as a refused row does not
        if self.url is not None:
            try:
                return self.score(prompts, completions), list(range(len(pairs))), {}
            except ValueError:  # the server refused a row (a 4xx): score each alone to find it
                outputs, kept, refused = [], [], {}
                for i, (prompt, completion) in enumerate(pairs):
                    try:
                        outputs.append(self.score([prompt], [completion]))
                        kept.append(i)
                    except ValueError as error:
                        refused[i] = f"completion {i}: {error}"
                fields = ("score", "rewards", "gating_output", "coefficients")
                if not outputs:
                    k = len(self.objective_names_)
                    return ScoreOutput(torch.zeros(0), *(torch.zeros(0, k) for _ in fields[1:])), kept, refused
                return ScoreOutput(*(torch.cat([getattr(o, f) for o in outputs]) for f in fields)), kept, refused
        model, tokenizer = self._load()
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        encoded, kept, refused = [], [], {}
        for i, (prompt, completion) in enumerate(pairs):
            try:
                row = self.encode(prompt, completion, where=f"completion {i}")
                if limit is not None and len(row) > limit:
                    raise ValueError(
                        f"completion {i} has {len(row)} tokens, more than the backbone's `max_position_embeddings` "
                        f"({limit}); shorten it before scoring."
                    )
            except ValueError as error:
                refused[i] = str(error)
                continue
            encoded.append(row)
            kept.append(i)
        outputs = score_encoded(
            model, encoded, self.batch_size, pad_token_id(tokenizer), max_batch_tokens=self.max_batch_tokens
        )
        return outputs, kept, refused

    def __call__(
        self, prompts: list, completions: list, log_metric=None, log_extra=None, **kwargs
    ) -> list[float | None]:
        out, kept, refused = self._score_scorable(prompts, completions)
        if refused:
            logger.warning(
                f"{self.__name__}: {len(refused)} of {len(prompts)} completions cannot be scored and get None (TRL "
                f"leaves them out of this reward): {'; '.join(list(refused.values())[:3])}"
            )
        if self.objective_indices_ is None:
            score = out.score
            if self.normalize and not self.server_normalizes_:
                score = normalize_scores(score, self.score_statistics_)
            values = score.tolist()
        else:
            values = out.rewards[:, self.objective_indices_].sum(-1).tolist()
        # A NaN would reach TRL, which `nansum`s it to 0 without a word (the local path raises in `score_encoded`).
        non_finite = [i for i, value in zip(kept, values) if not math.isfinite(value)]
        if non_finite:
            raise NonFiniteScoreError(
                f"{self.__name__}: completion(s) {non_finite} got a non-finite reward (NaN or Inf), which is never a "
                "reward: the reward model overflowed (in float16? run it in bfloat16 or float32) or its weights hold "
                "non-finite values.",
                non_finite,
            )
        result: list[float | None] = [None] * len(prompts)
        for i, value in zip(kept, values):
            result[i] = value
        if not kept:
            return result
        rewards, gating = out.rewards, out.gating_output  # (n, k), (n, k) over the scored rows
        if log_metric is not None:
            # g / Σ g: the softmax share of each objective in the mixture (β divided out).
            shares = gating / gating.sum(-1, keepdim=True)
            for i, name in enumerate(self.objective_names_):
                log_metric(f"{self.__name__}/rewards/{name}", rewards[:, i].mean().item())
                log_metric(f"{self.__name__}/gating/{name}", shares[:, i].mean().item())
        if log_extra is not None:
            # The objective that moved each score most: the largest |c_i r_i|, with c = g Tᵀ.
            top = (out.coefficients * rewards).abs().argmax(-1).tolist()
            column: list[str | None] = [None] * len(prompts)  # one entry per completion, as TRL's table has
            for i, objective in zip(kept, top):
                column[i] = self.objective_names_[objective]
            log_extra(f"{self.__name__}/top_objective", column)
        return result

    def __repr__(self) -> str:
        source = self.model_or_path
        if self.url is not None:
            source = self.url
        elif isinstance(source, PreTrainedModel):
            source = type(source).__name__
        else:
            source = os.fspath(source)
        return (
            f"ArmoRMReward({source!r}, objectives={self.objectives}, batch_size={self.batch_size}, "
            f"max_batch_tokens={self.max_batch_tokens}, normalize={self.normalize})"
        )


__all__ = ["ArmoRMReward", "encode_prompt_completion"]
