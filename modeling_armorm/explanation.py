# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Why a conversation got its score: each objective's reward, the weight the prompt gave it, and their product.

    s = g · (r T) = Σ_i c_i r_i,   c = g Tᵀ

r_i is objective i's raw reward, c_i its coefficient (the gating weights g mixed through the verbosity
decorrelation T) and c_i r_i its contribution: the contributions add up to the score. The verbosity objective v has
g_v = 0 in a gate trained by this package, yet a coefficient c_v = −Σ_i λ_i g_i: every objective that gets weight
pays back its share of length, so a negative contribution from verbosity is the length penalty at work.

Each objective says what it was learned from (`learned_from`): the rated objectives from ratings; `preference`
(`armorm fit --preference`) is a Bradley-Terry score learned from preference pairs, not from ratings; the length
objective is the answer's length itself.
"""

from dataclasses import asdict, dataclass, field

from .heads import LENGTH_OBJECTIVE, PREFERENCE_OBJECTIVE


__all__ = ["Explanation", "ObjectiveContribution", "explanation_from_heads", "learned_from"]

# What an objective's reward was learned from, by name; every other objective was fitted on ratings.
LEARNED_FROM = {
    PREFERENCE_OBJECTIVE: "preference pairs (a Bradley-Terry score, not from ratings)",
    LENGTH_OBJECTIVE: "the answer's length in tokens, log(1 + n) (not learned)",
}


def learned_from(name: str) -> str:
    """What objective `name`'s reward was learned from: `"ratings"`, or the `LEARNED_FROM` entry of its name."""
    return LEARNED_FROM.get(name, "ratings")


@dataclass
class ObjectiveContribution:
    """One objective's part in a score: `contribution = coefficient × reward`; `learned_from`: what its reward was
    learned from (`learned_from`)."""

    name: str
    reward: float
    coefficient: float
    contribution: float
    learned_from: str = "ratings"


@dataclass
class Explanation:
    """A score taken apart by objective.

    Args:
        score: s, the model's score of the conversation.
        objectives: every objective, sorted by |contribution|, largest first; the contributions sum to `score`.
        gating: g, the prompt's gating weight of each objective (β included), in the model's objective order.
        top: the first `top_k` of `objectives`.
    """

    score: float
    objectives: list[ObjectiveContribution]
    gating: dict[str, float]
    top: list[ObjectiveContribution] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready values: `{"score", "objectives", "gating", "top"}`."""
        return {
            "score": self.score,
            "objectives": [asdict(o) for o in self.objectives],
            "gating": dict(self.gating),
            "top": [asdict(o) for o in self.top],
        }


def explanation_from_heads(
    names: list[str],
    score: float,
    rewards: list[float],
    coefficients: list[float],
    gating: list[float],
    top_k: int = 3,
) -> Explanation:
    """The `Explanation` of one row of the model's outputs (`score`, `rewards`, `coefficients`, `gating_output`)."""
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0, got {top_k}.")
    objectives = [
        ObjectiveContribution(name, float(r), float(c), float(c) * float(r), learned_from(name))
        for name, r, c in zip(names, rewards, coefficients, strict=True)
    ]
    # sorted() is stable: objectives of equal |contribution| keep the model's order.
    objectives = sorted(objectives, key=lambda o: -abs(o.contribution))
    return Explanation(
        score=float(score),
        objectives=objectives,
        gating={name: float(g) for name, g in zip(names, gating, strict=True)},
        top=objectives[:top_k],
    )
