# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Preference pairs from one prompt's scored candidates, in TRL's conversational preference layout.

Each pair is a row `{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}`: the prompt's messages,
the chosen and the rejected answer each as `[{"role": "assistant", "content": ...}]`, and their scores. The rules
(`PAIR_RULES`), over the candidates that have a score (a candidate whose score is None was not scored, and is left
out):

* `best-worst` (SimPO's and Online-RLHF's pairs): the highest-scored answer against the lowest, the first of equal
  scores in answer order; made only when the best score exceeds the worst by more than `min_margin`.
* `all`: every ordered pair (i, j) whose scores differ by more than `min_margin`, s_i - s_j > min_margin, in answer
  order of i, then j.
* `none`: no pairs.

A tie makes no pair and is counted, once per unordered pair of answers: two equal scores, or two identical answer
texts (whatever their scores: an answer is never preferred to itself). Under `best-worst`, the prompt counts one
tie when its best and worst answer tie (all its scores equal, or the two texts the same), none with fewer than two
scored answers. A pair within `min_margin` that is not a tie is dropped without being counted.
"""

import math
from collections.abc import Sequence


__all__ = ["PAIR_RULES", "make_pairs"]

PAIR_RULES = ("best-worst", "all", "none")


def make_pairs(
    prompt: list[dict], answers: list[str], scores: Sequence[float | None], rule: str, min_margin: float = 0.0
) -> tuple[list[dict], int]:
    """The preference pairs of one prompt's `answers` under `rule`, and the number of ties dropped.

    Args:
        prompt: the prompt's chat messages.
        answers: the candidate answers, as text.
        scores: each answer's score, None for an answer that was not scored.
        rule: one of `PAIR_RULES`.
        min_margin: a pair's chosen answer must score more than `min_margin` above its rejected one (>= 0).
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"Unknown pair rule {rule!r}: choose one of {', '.join(PAIR_RULES)}.")
    if not (isinstance(min_margin, int | float) and math.isfinite(min_margin) and min_margin >= 0):
        raise ValueError(f"`min_margin` is {min_margin!r}: it must be a finite number >= 0.")
    if len(scores) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores: give one score (or None) per answer.")
    scored = [j for j, score in enumerate(scores) if score is not None]
    for j in scored:
        if not math.isfinite(scores[j]):
            raise ValueError(f"answer {j} has the score {scores[j]!r}: a score is finite, or None when not scored.")
    if rule == "none":
        return [], 0

    def tie(i: int, j: int) -> bool:
        return scores[i] == scores[j] or answers[i] == answers[j]

    def pair(chosen: int, rejected: int) -> dict:
        return {
            "prompt": [dict(message) for message in prompt],
            "chosen": [{"role": "assistant", "content": answers[chosen]}],
            "rejected": [{"role": "assistant", "content": answers[rejected]}],
            "score_chosen": scores[chosen],
            "score_rejected": scores[rejected],
        }

    if rule == "best-worst":
        if len(scored) < 2:
            return [], 0
        best = max(scored, key=lambda j: scores[j])  # max and min return the first of equal values
        worst = min(scored, key=lambda j: scores[j])
        if tie(best, worst):
            return [], 1
        return ([pair(best, worst)] if scores[best] - scores[worst] > min_margin else []), 0

    ties = sum(tie(i, j) for a, i in enumerate(scored) for j in scored[a + 1 :])
    pairs = [
        pair(i, j) for i in scored for j in scored if i != j and not tie(i, j) and scores[i] - scores[j] > min_margin
    ]
    return pairs, ties
