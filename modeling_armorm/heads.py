# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The ArmoRM heads' math, written once (arXiv 2406.12845):

    t    = rightmost position with mask 1                the last real token        `last_token_positions`
    n    = t − gating position                           the answer's length        `answer_lengths`
    r    = W h                                           k objective rewards        `rewards`
    r_len = log(1 + n)                                   the length objective       `length_reward`
    r'   = r T                                           decorrelated rewards       `transform`
    s    = g · r' = g · (r T)                            the score                  `scores`
    c    = g Tᵀ                                          coefficients, s = c · r    `coefficients`
    z    = (s − mean) / std                              the normalized score       `normalize_scores`
    (s, r, g, c) from h, h_x and n, composed once                                   `armorm_heads`

(g = β · softmax(MLP(h_x) / temperature) is `ArmoRMGatingNetwork`.) `misplaced_turns` is the rule by which the model
and the vLLM plugin refuse raw token ids that are not one prompt and one answer. Three callers share these functions:
`ArmoRMForRewardModeling.forward` (one batch of hidden states), the vLLM plugin's heads, and the conversion and
evaluation stages, which apply the heads to stored features (`chunked_rewards`, `chunked_transformed_rewards`,
`pair_scores`: CHUNK_ROWS rows at a time, since the features of a large dataset do not fit twice in memory).

The length objective enters r in two ways, one function each, with the same value r_len = log(1 + n):
* in a checkpoint, W has a row for it (zeros, written by `armorm assemble`) and `set_length_objective` replaces
  that column, `config.length_objective`, in W h;
* on stored features, the regression file has no row for it: `append_length_objective` adds it as a last column,
  the objective `LENGTH_OBJECTIVE` of `armorm decorrelate --verbosity length`. `armorm assemble` puts it last too
  (`length_objective` = k), so both give the same r.

This file is copied next to every saved checkpoint (remote code): it imports only torch.
"""

import torch
from torch import nn


__all__ = [
    "CHUNK_ROWS",
    "LENGTH_OBJECTIVE",
    "PREFERENCE_OBJECTIVE",
    "PROMPT_ROLES",
    "SCORE_QUANTILES",
    "answer_lengths",
    "append_length_objective",
    "armorm_heads",
    "chunked_rewards",
    "chunked_transformed_rewards",
    "coefficients",
    "last_pattern_positions",
    "last_true_positions",
    "last_token_positions",
    "length_reward",
    "misplaced_turns",
    "normalize_scores",
    "pair_scores",
    "pattern_starts",
    "position_ids_from_mask",
    "rewards",
    "score_statistics",
    "scores",
    "set_length_objective",
    "transform",
]

CHUNK_ROWS = 65536
# The roles whose turn headers open a turn of the prompt (`ArmoRMConfig.turn_header_patterns`); "assistant" opens the
# answer.
PROMPT_ROLES = ("system", "user", "tool")
# The name of the length objective, the verbosity stand-in of `armorm decorrelate --verbosity length`.
LENGTH_OBJECTIVE = "answer-length"
# The name of the optional Bradley-Terry objective of `armorm fit --preference`: a row of W learned from preference
# pairs, not from ratings.
PREFERENCE_OBJECTIVE = "preference"
# The quantiles (in %) of the reference scores that `score_statistics` records.
SCORE_QUANTILES = (1, 5, 50, 95, 99)


# ----------------------------------------------------------------------------------------------------------------
# Positions from the attention mask


def last_token_positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """The last real token of each row: the rightmost position with mask 1, whatever the padding side or pad id.
    (batch, seq) → (batch,)"""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (seq,)
    return (positions * attention_mask.bool()).argmax(-1)  # (batch,)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions counted over the real tokens only, so a padded row (left or right) sees the unpadded row's positions.
    (batch, seq) → (batch, seq)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pattern_starts(input_ids: torch.LongTensor, attention_mask: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    """Where `pattern` starts among each row's real tokens: True at the first token of each occurrence.
    (batch, seq) → (batch, seq)"""
    batch_size, seq_len = input_ids.shape
    n = len(pattern)
    found = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=input_ids.device)
    if seq_len < n:
        return found
    pattern_ids = torch.tensor(pattern, dtype=input_ids.dtype, device=input_ids.device)
    windows = input_ids.unfold(1, n, 1)  # (batch, seq - n + 1, n)
    real = attention_mask.bool().unfold(1, n, 1).all(-1)  # the whole window is made of real tokens
    found[:, : seq_len - n + 1] = (windows == pattern_ids).all(-1) & real
    return found


def last_pattern_positions(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, pattern: list[int]
) -> torch.LongTensor:
    """Start of the last occurrence of `pattern` among each row's real tokens, -1 where it is absent. (batch,)"""
    return last_true_positions(pattern_starts(input_ids, attention_mask, pattern))


def last_true_positions(found: torch.Tensor) -> torch.LongTensor:
    """The rightmost True of each row, -1 where there is none. (batch, seq) → (batch,)"""
    starts = torch.arange(found.shape[-1], device=found.device)  # (seq,)
    return torch.where(found, starts, -1).amax(-1) if found.shape[-1] else found.new_full(found.shape[:-1], -1).long()


def misplaced_turns(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    pattern_positions: torch.LongTensor,
    turn_header_patterns: dict[str, list[int]] | None,
    gating_pattern: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of raw token ids that the chat template's turn headers (`turn_header_patterns`, role → token ids) show
    are not one prompt followed by one answer, given the start of the gating pattern's last occurrence in each row
    (`pattern_positions`, (batch,)): (batch, seq) → two (batch,) masks,

    * a prompt turn (a system, user or tool header) after the gating pattern: the conversation does not end with the
      assistant's answer;
    * two assistant headers (the gating pattern where the headers have none) after the last prompt turn: an answer
      that writes the template's markup, which would move h_x into itself.

    No headers (a checkpoint made before they were recorded): no row is flagged."""
    found = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if not turn_header_patterns:
        return found, found.clone()
    prompt_turns = torch.zeros_like(input_ids, dtype=torch.bool)  # (batch, seq)
    for role in PROMPT_ROLES:
        if turn_header_patterns.get(role):
            prompt_turns |= pattern_starts(input_ids, attention_mask, turn_header_patterns[role])
    last_prompt_turn = last_true_positions(prompt_turns)  # (batch,), -1 where the prompt has no header
    turn_after_answer = last_prompt_turn > pattern_positions
    assistant = turn_header_patterns.get("assistant") or gating_pattern
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)  # (seq,)
    answers = pattern_starts(input_ids, attention_mask, assistant) & (positions > last_prompt_turn[:, None])
    return turn_after_answer, answers.sum(-1) > 1


def answer_lengths(last_positions, gating_positions):
    """n = t − gating position: the answer's length in tokens (those after the gating position, up to the last real
    token t). Tensors of any one shape, or ints."""
    return last_positions - gating_positions


# ----------------------------------------------------------------------------------------------------------------
# The heads on one batch: h (..., d), h_x → g (..., k)


def rewards(h: torch.Tensor, regression: nn.Module | torch.Tensor) -> torch.Tensor:
    """r = W h: (..., d) → (..., k). `regression` is W as the model holds it, `nn.Linear(d, k, bias=False)` (called,
    so that hooks that gather or move its weight, DeepSpeed ZeRO-3's or accelerate's, run), or W itself (k, d)."""
    if isinstance(regression, nn.Module):
        return regression(h)
    return nn.functional.linear(h, regression)


def length_reward(answer_lengths: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """r_len = log(1 + n): the answer's length in tokens, on a scale where doubling a long answer adds a constant.
    (...,) → (...,)"""
    return torch.log1p(torch.as_tensor(answer_lengths).to(dtype))


def set_length_objective(r: torch.Tensor, answer_lengths: torch.Tensor, column: int) -> torch.Tensor:
    """r with column `column` (`config.length_objective`) replaced by r_len = log(1 + n): a checkpoint's W has a row
    for the length objective, unused. r (..., k), n (...,) → (..., k)"""
    _check_lengths(r, answer_lengths)
    is_length = torch.arange(r.shape[-1], device=r.device) == column  # (k,)
    return torch.where(is_length, length_reward(answer_lengths, r.dtype).to(r.device)[..., None], r)


def append_length_objective(r: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """r with r_len = log(1 + n) appended as a last column (`LENGTH_OBJECTIVE`): a regression file has no row for the
    length objective. r (..., k), n (...,) → (..., k + 1)"""
    _check_lengths(r, answer_lengths)
    return torch.cat([r, length_reward(answer_lengths, r.dtype).to(r.device)[..., None]], dim=-1)


def _check_lengths(r: torch.Tensor, answer_lengths: torch.Tensor) -> None:
    if answer_lengths.shape != r.shape[:-1]:
        raise ValueError(
            f"`answer_lengths` has shape {tuple(answer_lengths.shape)}, the rewards {tuple(r.shape[:-1])}: give one "
            "length per answer."
        )


def transform(r: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """r' = r T: rows are row vectors, so T multiplies on the right. (..., k) → (..., k)"""
    return r @ matrix


def scores(g: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
    """s = g · r' = Σ_i g_i (r T)_i, with `transformed` = r' (`transform(r, T)`). (..., k) → (...,)"""
    return (g * transformed).sum(-1)


def coefficients(g: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """c = g Tᵀ, the weight of each raw reward in the score: s = c · r. (..., k) → (..., k)"""
    return g @ matrix.T


def armorm_heads(
    h: torch.Tensor,
    h_x: torch.Tensor,
    answer_lengths: torch.Tensor,
    regression: nn.Module | torch.Tensor,
    gating: nn.Module,
    matrix: torch.Tensor,
    length_objective: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, r, g, c) from h (n, d) at each answer's last token, h_x (n, d) at its gating position and n (n,), the
    answer's tokens after the gating position: the one composition of the heads that the model's forward, its
    shared-prefix path and the vLLM plugin all run."""
    r = rewards(h, regression)  # r = W h, (n, k)
    if length_objective is not None:
        r = set_length_objective(r, answer_lengths, length_objective)  # r_len = log(1 + n) in place of W h
    g = gating(h_x)  # g = β softmax(MLP(h_x)/τ), (n, k)
    return scores(g, transform(r, matrix)), r, g, coefficients(g, matrix)  # s = g · (r T), c = g Tᵀ


# ----------------------------------------------------------------------------------------------------------------
# The heads on stored features, in chunks


def chunked_rewards(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    answer_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """r = W h for every row of stored features, CHUNK_ROWS rows at a time in `dtype` (the features may be
    bfloat16): embeddings (N, ..., d) → (N, ..., k); with `answer_lengths` (N, ...) → (N, ..., k + 1), the length
    objective last (`append_length_objective`)."""
    weight = weight.to(dtype)
    r = torch.cat([rewards(chunk.to(dtype), weight) for chunk in embeddings.split(CHUNK_ROWS)])  # (N, ..., k)
    return r if answer_lengths is None else append_length_objective(r, answer_lengths)


def chunked_transformed_rewards(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    matrix: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    answer_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """r' = (W h) T for every row of stored features (`chunked_rewards`, then `transform`). (N, ..., d) → (N, ..., k)"""
    return transform(chunked_rewards(embeddings, weight, dtype, answer_lengths), matrix.to(dtype))


def pair_scores(gating: nn.Module, prompt_embeddings: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
    """s = g(h_x) · r' for both answers of each pair: prompt_embeddings (B, d), transformed r' (B, 2, k) → (B, 2).

    The gating runs once per pair: both answers share the prompt, hence h_x and the weights g.
    """
    g = gating(prompt_embeddings)  # (B, k), softmax over the objectives, β included
    return scores(g[:, None], transformed)  # (B, 2)


# ----------------------------------------------------------------------------------------------------------------
# The score's scale


def score_statistics(scores: torch.Tensor) -> dict[str, float]:
    """The distribution of scores on reference answers, as `ArmoRMConfig.score_statistics` records it: `count`,
    `mean`, `std` (the population's, ddof 0) and the quantiles `p1` … `p99` of `SCORE_QUANTILES` (linear
    interpolation between the sorted scores, numpy's default). scores: any shape, in float64 here.

    `armorm assemble` records them from the build's reference pairs; for a checkpoint without them (an RLHFlow
    conversion), score a reference set of answers and set `config.score_statistics = score_statistics(scores)`."""
    s = torch.as_tensor(scores).detach().double().flatten().sort().values.cpu()
    if not len(s) or not torch.isfinite(s).all():
        raise ValueError(f"`score_statistics` needs finite scores, got {len(s)} with non-finite or none.")
    mean = s.mean()
    statistics = {"count": len(s), "mean": float(mean), "std": float((s - mean).pow(2).mean().sqrt())}
    for q in SCORE_QUANTILES:
        # numpy's "linear": position q (n − 1) in the sorted scores, between its two neighbours.
        position = q / 100 * (len(s) - 1)
        low = int(position)
        high = min(low + 1, len(s) - 1)
        statistics[f"p{q}"] = float(s[low] + (s[high] - s[low]) * (position - low))
    return statistics


def normalize_scores(scores, statistics: dict[str, float] | None):
    """z = (s − mean) / std: the score in standard deviations from the reference answers' mean (0: their mean, +1:
    one standard deviation above it), `statistics` being `config.score_statistics`. Only the score is normalized:
    rewards, gating weights and coefficients stay raw. scores: a tensor of any shape, or a float."""
    if statistics is None:
        raise ValueError(
            "This checkpoint records no score statistics (`config.score_statistics` is None: a converted RLHFlow "
            "checkpoint, or one assembled before they were recorded), so its scores cannot be normalized. Drop "
            "`normalize`, or score a reference set of answers (e.g. both answers of a few thousand preference pairs) "
            "and record their distribution: `config.score_statistics = modeling_armorm.heads.score_statistics(scores)`"
            ", then `config.save_pretrained(CKPT)`."
        )
    return (scores - statistics["mean"]) / statistics["std"]
