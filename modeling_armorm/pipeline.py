# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The `reward-scoring` pipeline: score, compare, rank and explain conversations with an ArmoRM.

    import modeling_armorm  # registers the task
    from transformers import pipeline

    rm = pipeline("reward-scoring", model="/abs/path/checkpoint", batch_size=16)
    rm([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    # {"score": 0.41, "rewards": {objective: r_i}, "gating": {objective: g_i}}

How it fits transformers' `Pipeline`: `preprocess` encodes one conversation (`scoring.ChatEncoder`: the gating
position from the rendering, markup in an answer kept as text), `_forward` scores a list of encoded conversations
with `scoring.score_encoded` (length-sorted, right-padded batches of `batch_size` rows and at most
`max_batch_tokens` padded tokens, answers to one prompt running it once, outputs put back in input order), and
`postprocess` turns the per-row heads into plain dicts. `__call__` runs the three over the whole input at once rather
than one item at a time, so the batches are sorted by length across every conversation given; `device`, `dtype` and
`batch_size` are the base class's arguments, `max_batch_tokens` this pipeline's, and so are `max_length` and
`truncate_prompt` (the length policy of `length_policy.ConversationEncoder`, which `armorm extract` and
`armorm evaluate` apply too), and `normalize` (the score as (s − mean) / std of the reference answers,
`heads.normalize_scores`). `dtype="auto"` (transformers' default) is `settings.resolve_dtype`'s: the saved dtype,
but float32 for a bfloat16 or float16 model on a CPU that only emulates it.
"""

from collections.abc import Sequence

from transformers import Pipeline

from .explanation import Explanation, explanation_from_heads
from .heads import normalize_scores
from .length_policy import ConversationEncoder
from .scoring import (
    ChatEncoder,
    EncodedConversation,
    ScoreOutput,
    model_gating_pattern,
    objective_names,
    pad_token_id,
    score_encoded,
)
from .settings import DEFAULT_BATCH_SIZE, fit_dtype


__all__ = ["ArmoRMPipeline", "TASK"]

TASK = "reward-scoring"
Message = dict[str, str]


def is_conversation(value) -> bool:
    """One conversation (a list of message dicts), as opposed to a list of conversations."""
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


def as_prompt(prompt: str | Sequence[Message]) -> list[Message]:
    """A prompt as messages: a string is one user turn; a message list is kept (it must not hold the answer)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if is_conversation(prompt):
        if prompt[-1].get("role") == "assistant":
            raise ValueError(
                "The prompt ends with an assistant turn; give the conversation without the answer (the answers are "
                "passed separately)."
            )
        return list(prompt)
    raise ValueError(f"The prompt must be a string or a list of messages, got {prompt!r:.80}.")


def as_answer(answer, where: str) -> Message:
    if not isinstance(answer, str):
        raise ValueError(f"{where} must be a string (the assistant's answer), got {answer!r:.80}.")
    return {"role": "assistant", "content": answer}


class ArmoRMPipeline(Pipeline):
    """Scores conversations with an `ArmoRMForRewardModeling` (task `"reward-scoring"`).

    Every method scores through `modeling_armorm.scoring`, the path of `armorm evaluate` and `ArmoRMReward`.

    Args (to `transformers.pipeline("reward-scoring", ...)`, besides the usual `model`, `tokenizer`, `device`):
        dtype (`str` or `torch.dtype`, defaults to `"auto"`): `"auto"` runs the model in the dtype it was saved in,
            except a bfloat16 or float16 model on a CPU without native support for it, which runs in float32 (about 4x
            faster there; a model given as an object is cast in place, as the base class moves it to `device`). Pass
            `torch.bfloat16` to keep bfloat16 there (a warning says how much slower it runs).
        batch_size (`int`, defaults to 8): conversations per forward pass, sorted by length first.
        max_batch_tokens (`int`, *optional*): padded tokens per forward pass (rows × the longest row): a batch holds
            at most `batch_size` rows and no more than fit this budget (a longer conversation runs alone). Default on
            a CPU: 4096 where the batches are packed (`packing`), 1024 padded; rows only on a GPU.
        max_length (`int`, *optional*): refuse (a `ValueError` naming it) a conversation longer than this many
            tokens; the backbone's `max_position_embeddings` always binds.
        truncate_prompt (`bool`, defaults to `False`): instead of refusing a conversation that is too long, drop its
            earliest prompt turns (never the system turn, the last user turn or the answer) until it fits; one that
            does not fit even then still raises the `ValueError`.
        normalize (`bool`, defaults to `False`): return each score as z = (s − mean) / std, with the mean and
            standard deviation of the scores of the checkpoint's reference answers (`config.score_statistics`,
            recorded by `armorm assemble`; a checkpoint without them raises a `ValueError` saying how to record
            them). Only `score` (and what `compare` and `rank` derive from it) is normalized: rewards and gating
            weights stay raw, and so does `explain`, whose contributions sum to the raw score.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        dtype = kwargs.get("dtype") or "auto"  # the base class drops it: transformers loaded the model with it
        super().__init__(*args, **kwargs)
        self.model = fit_dtype(self.model, dtype, self.device)
        if self.tokenizer is None:
            raise ValueError(
                "The reward-scoring pipeline needs the reward model's tokenizer (its chat template locates the prompt "
                "feature): pass `tokenizer=` or a checkpoint folder that holds one."
            )
        self.encoder = ChatEncoder(self.tokenizer, model_gating_pattern(self.model, self.tokenizer))
        self.objective_names = objective_names(self.model.config)

    def _sanitize_parameters(
        self,
        max_length: int | None = None,
        batch_size: int | None = None,
        truncate_prompt: bool | None = None,
        max_batch_tokens: int | None = None,
        normalize: bool | None = None,
    ):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if normalize is not None:
            if normalize:
                normalize_scores(0.0, self.model.config.score_statistics)  # a checkpoint without them fails here
            postprocess_params["normalize"] = normalize
        if truncate_prompt is not None:
            preprocess_params["truncate_prompt"] = truncate_prompt
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"`max_length` must be >= 1, got {max_length}.")
            forward_params["max_length"] = max_length
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
            forward_params["batch_size"] = batch_size
        if max_batch_tokens is not None:
            if max_batch_tokens < 1:
                raise ValueError(f"`max_batch_tokens` must be >= 1, got {max_batch_tokens}.")
            forward_params["max_batch_tokens"] = max_batch_tokens
        return preprocess_params, forward_params, postprocess_params

    # The three stages of a transformers pipeline, over the one scoring path.

    def preprocess(self, conversation, where: str = "the conversation") -> EncodedConversation:
        return self.encoder.encode(conversation, where)

    def _forward(
        self,
        encoded: list[EncodedConversation],
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> ScoreOutput:
        return score_encoded(
            self.model,
            encoded,
            batch_size,
            pad_token_id(self.tokenizer),
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
        )

    def postprocess(self, outputs: ScoreOutput, normalize: bool = False) -> list[dict]:
        names = self.objective_names
        score = outputs.score
        if normalize:
            score = normalize_scores(score, self.model.config.score_statistics)
        return [
            {
                "score": score,
                "rewards": dict(zip(names, rewards)),
                "gating": dict(zip(names, gating)),
            }
            for score, rewards, gating in zip(score.tolist(), outputs.rewards.tolist(), outputs.gating_output.tolist())
        ]

    def _run(
        self,
        conversations: list,
        batch_size: int | None,
        max_length: int | None,
        truncate_prompt: bool | None,
        max_batch_tokens: int | None = None,
    ) -> ScoreOutput:
        """Encode every conversation, then score them all in length-sorted batches; outputs in input order."""
        call_preprocess, call_params, _ = self._sanitize_parameters(
            max_length=max_length,
            batch_size=batch_size,
            truncate_prompt=truncate_prompt,
            max_batch_tokens=max_batch_tokens,
        )
        # `transformers.Pipeline` defaults to batch_size=1; this pipeline to scoring's `DEFAULT_BATCH_SIZE`.
        params = {"batch_size": self._batch_size or DEFAULT_BATCH_SIZE, **self._forward_params, **call_params}
        encoded = [self.preprocess(c, where=f"conversation {i}") for i, c in enumerate(conversations)]
        if {**self._preprocess_params, **call_preprocess}.get("truncate_prompt"):
            encoded = self._truncate_prompts(conversations, encoded, params.get("max_length"))
        return self.forward(encoded, **params)

    def _truncate_prompts(
        self, conversations: list, encoded: list[EncodedConversation], max_length: int | None
    ) -> list[EncodedConversation]:
        """`encoded`, each conversation longer than the limit (`max_length` or the backbone's positions, the smaller)
        encoded again without its earliest prompt turns, as few as make it fit (`ConversationEncoder`, the policy
        of `armorm extract`). One that does not fit even then raises a `ValueError` naming it."""
        position_limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if max_length is None and position_limit is None:
            return encoded
        policy = ConversationEncoder(
            self.tokenizer,
            max_length or position_limit,
            truncate_prompt=True,
            position_limit=position_limit,
            pattern=self.encoder.pattern,
        )
        fitted = list(encoded)
        for i, (conversation, row) in enumerate(zip(conversations, encoded)):
            if len(row) > policy.max_length:
                (result,) = policy.encode([[conversation]])
                if isinstance(result, str):
                    raise ValueError(f"Conversation {i}: {result}.")
                fitted[i] = result.sides[0]
        return fitted

    # The public API.

    def __call__(
        self,
        conversations,
        batch_size: int | None = None,
        max_length: int | None = None,
        truncate_prompt: bool | None = None,
        max_batch_tokens: int | None = None,
        normalize: bool | None = None,
    ):
        """`score(conversations)`."""
        return self.score(
            conversations,
            batch_size=batch_size,
            max_length=max_length,
            truncate_prompt=truncate_prompt,
            max_batch_tokens=max_batch_tokens,
            normalize=normalize,
        )

    def score(
        self,
        conversations,
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        truncate_prompt: bool | None = None,
        max_batch_tokens: int | None = None,
        normalize: bool | None = None,
    ):
        """Score one conversation (a message list ending with the assistant's answer) or a list of them.

        Returns `{"score": s, "rewards": {objective: r_i}, "gating": {objective: g_i}}` per conversation (a list, in
        input order, for a list); with `normalize`, s is (s − mean) / std (see the class docstring)."""
        single = is_conversation(conversations)
        rows = [conversations] if single else list(conversations)
        postprocess_params = {**self._postprocess_params, **self._sanitize_parameters(normalize=normalize)[2]}
        outputs = self._run(rows, batch_size, max_length, truncate_prompt, max_batch_tokens)
        results = self.postprocess(outputs, **postprocess_params)
        return results[0] if single else results

    def compare(self, prompt, answer_a: str, answer_b: str, **kwargs) -> dict:
        """Which of two answers to `prompt` (a string: one user turn; or the messages before the answer) scores higher.

        Returns `{"scores": [s_a, s_b], "preferred": "a" | "b" | "tie", "margin": s_a − s_b}`."""
        messages = as_prompt(prompt)
        pair = [[*messages, as_answer(answer_a, "answer_a")], [*messages, as_answer(answer_b, "answer_b")]]
        s_a, s_b = (row["score"] for row in self.score(pair, **kwargs))
        preferred = "a" if s_a > s_b else "b" if s_b > s_a else "tie"
        return {"scores": [s_a, s_b], "preferred": preferred, "margin": s_a - s_b}

    def rank(self, prompt, candidates: Sequence[str], **kwargs) -> list[dict]:
        """The candidate answers to `prompt`, best first: `{"rank", "index", "answer", "score"}` (rank 1 = best; equal
        scores keep the candidates' order)."""
        if isinstance(candidates, str) or not candidates:
            raise ValueError("`candidates` must be a non-empty list of answer strings.")
        messages = as_prompt(prompt)
        rows = [[*messages, as_answer(answer, f"candidate {i}")] for i, answer in enumerate(candidates)]
        scores = [row["score"] for row in self.score(rows, **kwargs)]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [
            {"rank": rank, "index": i, "answer": candidates[i], "score": scores[i]}
            for rank, i in enumerate(order, start=1)
        ]

    def explain(self, conversations, top_k: int = 3, **kwargs) -> Explanation | list[Explanation]:
        """Each objective's reward r_i, coefficient c_i (c = g Tᵀ) and contribution c_i r_i (they sum to the score),
        the gating weights g, and the `top_k` objectives by |contribution|. One conversation or a list of them."""
        single = is_conversation(conversations)
        rows = [conversations] if single else list(conversations)
        options = ("batch_size", "max_length", "truncate_prompt", "max_batch_tokens")
        options = {name: kwargs.pop(name, None) for name in options}
        if kwargs.pop("normalize", None):
            raise ValueError(
                "`explain` is on the raw scale (its contributions sum to the raw score s), so it takes no `normalize`; "
                "`score(..., normalize=True)` gives the normalized score."
            )
        if kwargs:
            raise TypeError(f"explain() got unexpected keyword arguments {sorted(kwargs)}.")
        out = self._run(rows, **options)
        explanations = [
            explanation_from_heads(
                self.objective_names,
                out.score[i].item(),
                out.rewards[i].tolist(),
                out.coefficients[i].tolist(),
                out.gating_output[i].tolist(),
                top_k=top_k,
            )
            for i in range(len(out))
        ]
        return explanations[0] if single else explanations
