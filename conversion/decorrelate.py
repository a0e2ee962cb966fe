"""Decorrelate every objective from verbosity: the reward transform T of ArmoRM (arXiv 2406.12845 §3.2).

    armorm decorrelate --regression regression.safetensors --reference PAIR_FEATURES \
        --verbosity helpsteer-verbosity [--threshold 0.03] --out transform.safetensors

Over the reference responses D (both sides of every pair of a pairs features folder, or the rows of a ratings
folder) the rewards are r = W h. For each objective i ≠ v (v = verbosity) the penalty λ_i is the smallest λ ≥ 0 with
Spearman(r_i − λ r_v, r_v) ≤ τ, found by bisection; then T = I, T[v, :] −= λ, T[v, v] = 0, so that r' = r T.
The verbosity objective is chosen here and only here (`--verbosity`: a name, `auto` for the one objective named
`*verbosity*`, `none` for T = I); the transform file records its name. Writes `transform.safetensors`
(`reward_transform_matrix`, `penalties`) and the report `decorrelate.json` with the correlations.

A verbosity objective the rating data does not support (`--min-objective-rows`, `--min-objective-z`) is refused by
name, or passed over by `auto`. Its support metrics come from the regression file's metadata (`armorm fit` records
them); for a file without them, from the `fit.json` beside it if it was written for that very file (then listed
among the report's inputs as `fit_report`), else no floor applies and a warning says so (`conversion.support`).
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm.auto import tqdm

from armorm_io.artifacts import head_fingerprint, load_regression, save_transform
from armorm_io.features import folder_fingerprint, load_pair_features
from armorm_io.reports import report_path, write_report
from conversion.preference import cross_fitted_rewards
from conversion.support import SupportSettings, find_support, unsupported_reason
from modeling_armorm.heads import LENGTH_OBJECTIVE
from modeling_armorm.settings import Location, normalize_locations


logger = logging.getLogger(__name__)

__all__ = [
    "ARGUMENTS",
    "DecorrelateConfig",
    "DecorrelateSettings",
    "DecorrelationResult",
    "RENAMED_FLAGS",
    "decorrelate",
    "find_penalty",
    "main",
    "reference_embeddings",
    "resolve_verbosity",
    "spearman_to",
    "transform_matrix",
]


# The support floor is one setting with `armorm gate` (`conversion.support.SupportSettings`): its old flags still work.
RENAMED_FLAGS = {"min-verbosity-rows": "min-objective-rows", "min-verbosity-z": "min-objective-z"}


@dataclass(kw_only=True)
class DecorrelateSettings(SupportSettings):
    """The knobs of `armorm decorrelate` (the ones `armorm build` passes on as `--decorrelate-<name>`)."""

    verbosity: str = field(
        default="auto",
        metadata={
            "help": "The verbosity objective v: an objective's name; `length` (the answer's length in tokens, "
            "log(1 + n), added as the objective `answer-length`); `auto` (the one objective named *verbosity* if the "
            "data supports it, else `length`); or `none` (T = I, no decorrelation)."
        },
    )
    threshold: float = field(default=0.03, metadata={"help": "τ: the Spearman correlation with r_v to reach."})
    tolerance: float = field(default=1e-3, metadata={"help": "Bisection tolerance on each penalty λ."})
    max_penalty: float = field(
        default=1e3, metadata={"help": "Largest λ tried; an objective that needs more is left unchanged and reported."}
    )


@dataclass(kw_only=True)
class DecorrelateConfig(DecorrelateSettings):
    """`armorm decorrelate`: what it reads and writes, and its settings."""

    regression: Location = field(metadata={"help": "`regression.safetensors` of `armorm fit` (W, objective names)."})
    reference: list[Location] | None = field(
        default=None,
        metadata={"help": "Features folder(s) of the reference set D (pairs: both answers). Not read for T = I."},
    )
    out: Location = field(metadata={"help": "The `transform.safetensors` to write (`decorrelate.json` beside it)."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)


ARGUMENTS = (DecorrelateConfig,)


def resolve_verbosity(
    config: DecorrelateSettings, objectives: list[str], metrics: dict | None, lengths: bool
) -> tuple[str | None, str]:
    """The verbosity objective (a name, `LENGTH_OBJECTIVE`, or None for T = I) and the reason for the choice.

    `metrics` are the regression's support metrics (`conversion.support.find_support`; None: unknown, no floor
    applied); `lengths` says whether the reference features hold the answers' lengths.
    """
    floors = (config.min_objective_rows, config.min_objective_z)
    if config.verbosity == "none":
        return None, "`--verbosity none`: no decorrelation asked for, T = I"
    if config.verbosity == "length":
        return LENGTH_OBJECTIVE, "`--verbosity length`: the answer's length in tokens, log(1 + n)"
    if config.verbosity != "auto":
        if config.verbosity not in objectives:
            raise ValueError(
                f"`--verbosity {config.verbosity}` is not an objective of the regression; its objectives: "
                f"{objectives}. Pass one of them, `length`, `auto` or `none`."
            )
        problem = unsupported_reason(config.verbosity, (metrics or {}).get(config.verbosity), *floors)
        if metrics is not None and problem:
            raise ValueError(
                f"{problem}: too little to trust as the verbosity every other objective is decorrelated from. Pass "
                "`--verbosity length` (the answer's length), `--verbosity none` (T = I), or lower the floor "
                "explicitly (`--min-objective-rows 0 --min-objective-z -1`)."
            )
        return config.verbosity, f"`--verbosity {config.verbosity}`"
    named = [name for name in objectives if "verbosity" in name.lower()]
    if len(named) > 1:
        raise ValueError(f"Several objectives name verbosity ({named}): choose one with `--verbosity`.")
    problem = unsupported_reason(named[0], (metrics or {}).get(named[0]), *floors) if named else None
    if named and not problem:
        return named[0], f"`--verbosity auto`: the one objective named *verbosity*, `{named[0]}`"
    why = f"{problem}, too little to trust" if problem else f"no objective among {objectives} names verbosity"
    if lengths:
        return LENGTH_OBJECTIVE, f"`--verbosity auto`: {why}; decorrelating from the answer's length instead"
    return None, f"`--verbosity auto`: {why}, and the reference features hold no answer lengths: T = I"


class _SpearmanToFixed:
    """Spearman(x, y) for many x against one fixed y: y's ranks are computed once (D can hold 10⁵ responses).

    Spearman's ρ is Pearson's correlation of the average ranks, which is what `scipy.stats.spearmanr` computes.
    """

    def __init__(self, y: np.ndarray):
        ranks = rankdata(y)
        self.centered = ranks - ranks.mean()
        self.norm = np.linalg.norm(self.centered)

    def __call__(self, x: np.ndarray) -> float:
        ranks = rankdata(x)
        centered = ranks - ranks.mean()
        norm = np.linalg.norm(centered)
        # A constant x carries no verbosity (or anything else): call it uncorrelated rather than NaN.
        if norm == 0.0:
            return 0.0
        return float(centered @ self.centered / (norm * self.norm))


def spearman_to(y: np.ndarray):
    """A function x ↦ Spearman(x, y), for a y that is not constant."""
    if np.ptp(y) == 0:
        raise ValueError(
            "The verbosity reward r_v is constant over the reference responses, so no correlation with it is defined. "
            "Check `--verbosity` (is it the right objective?) and that its row of W is fitted (not all zeros)."
        )
    return _SpearmanToFixed(y)


def find_penalty(
    reward: np.ndarray,
    verbosity_reward: np.ndarray,
    threshold: float,
    tolerance: float = 1e-3,
    max_penalty: float = 1e3,
    correlation=None,
) -> tuple[float, float, bool]:
    """The smallest λ ≥ 0 with Spearman(reward − λ·verbosity_reward, verbosity_reward) ≤ threshold, within `tolerance`.

    Returns (λ, the correlation at λ, reached). The correlation falls monotonically as λ grows (each pair of responses
    can only swap order one way), so a bisection is exact up to `tolerance`; it returns the end of its bracket that
    meets τ. Not reached within `max_penalty`: (0.0, the correlation at 0, False), the objective left unchanged.
    """
    if correlation is None:
        correlation = spearman_to(verbosity_reward)

    def rho(penalty: float) -> float:
        # ρ(λ) = Spearman(r_i − λ r_v, r_v)
        return correlation(reward - penalty * verbosity_reward)

    rho_zero = rho(0.0)
    if rho_zero <= threshold:
        return 0.0, rho_zero, True
    # Expand the upper end until it meets τ: λ has no natural scale (it depends on the ratio of the two rewards).
    low, high = 0.0, min(1.0, max_penalty)
    rho_high = rho(high)
    while rho_high > threshold:
        if high >= max_penalty:
            return 0.0, rho_zero, False
        low, high = high, min(2.0 * high, max_penalty)
        rho_high = rho(high)
    # Invariant: ρ(low) > τ ≥ ρ(high).
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        rho_middle = rho(middle)
        if rho_middle <= threshold:
            high, rho_high = middle, rho_middle
        else:
            low = middle
    # T is stored in float32: round λ up to a float32 so the stored penalty still meets τ (ρ falls as λ grows).
    stored = np.float32(high)
    if stored < high:
        stored = np.nextafter(stored, np.float32(np.inf))
    if stored != high:
        high, rho_high = float(stored), rho(float(stored))
    return high, rho_high, True


def transform_matrix(penalties: torch.Tensor, verbosity: int) -> torch.Tensor:
    """T with r' = r T: r'_i = r_i − λ_i r_v for i ≠ v and r'_v = 0."""
    k = penalties.shape[0]
    matrix = torch.eye(k, dtype=torch.float32)
    # T = I; T[v, :] −= λ; T[v, v] = 0
    matrix[verbosity, :] -= penalties.to(torch.float32)
    matrix[verbosity, verbosity] = 0.0
    return matrix


@dataclass
class DecorrelationResult:
    """The penalties λ (k,), T (k, k) and, per objective, Spearman(r'_i, r_v) before and after."""

    penalties: torch.Tensor
    matrix: torch.Tensor
    correlations_before: list[float]
    correlations_after: list[float]
    unreachable: list[int] = field(default_factory=list)


def decorrelate(
    rewards: torch.Tensor,
    verbosity: int,
    threshold: float = 0.03,
    tolerance: float = 1e-3,
    max_penalty: float = 1e3,
    objectives: list[str] | None = None,
) -> DecorrelationResult:
    """λ_i for every objective i ≠ `verbosity` from the rewards r (n, k) of the reference responses, and T."""
    if rewards.ndim != 2:
        raise ValueError(f"`rewards` must be (n, k), got shape {tuple(rewards.shape)}.")
    n, k = rewards.shape
    if not 0 <= verbosity < k:
        raise ValueError(f"`verbosity` must index one of the {k} objectives, got {verbosity}.")
    if n < 3:
        raise ValueError(f"The reference set holds {n} responses; a rank correlation needs at least 3 (more: 10⁴+).")
    names = objectives or [str(i) for i in range(k)]
    # float64: the bisection compares correlations at λ's 1e-3 apart.
    values = rewards.detach().cpu().double().numpy()
    verbosity_reward = values[:, verbosity]
    correlation = spearman_to(verbosity_reward)
    penalties = torch.zeros(k, dtype=torch.float64)
    before, after, unreachable = [], [], []
    for i in tqdm(range(k), desc="decorrelate", dynamic_ncols=True):
        if i == verbosity:
            # r'_v = 0: the verbosity objective leaves the score.
            before.append(1.0)
            after.append(0.0)
            continue
        before.append(correlation(values[:, i]))
        penalty, rho, reached = find_penalty(
            values[:, i], verbosity_reward, threshold, tolerance, max_penalty, correlation=correlation
        )
        penalties[i] = penalty
        after.append(rho)
        if not reached:
            unreachable.append(i)
            logger.warning(
                "Objective `%s` keeps Spearman %.4f > τ = %g with the verbosity reward for every λ ≤ %g; it is left "
                "unchanged (λ = 0). Raise `--max-penalty` or `--threshold`, or check its regression row.",
                names[i],
                before[-1],
                threshold,
                max_penalty,
            )
    return DecorrelationResult(
        penalties=penalties.float(),
        matrix=transform_matrix(penalties, verbosity),
        correlations_before=before,
        correlations_after=after,
        unreachable=unreachable,
    )


def reference_embeddings(features: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The response features h of a features folder as (n, d): pairs (N, 2, d) give both sides, 2N rows."""
    embeddings = features["embeddings"]
    if embeddings.ndim == 3:
        return embeddings.reshape(-1, embeddings.shape[-1])
    if embeddings.ndim == 2:
        return embeddings
    raise ValueError(
        f"`embeddings` of the {meta.get('kind', 'unknown')} features has shape {tuple(embeddings.shape)}; "
        "expected (N, d) for ratings or (N, 2, d) for pairs."
    )


def main(config: DecorrelateConfig | None = None, /, **kwargs) -> dict:
    """Load → compute → save `config.out` (T, λ) and its report `decorrelate.json`, which it returns. Pass a
    `DecorrelateConfig`, or its fields as keywords."""
    config = config or DecorrelateConfig(**kwargs)
    weight, _, objectives = load_regression(config.regression)
    features = load_pair_features(config.reference)[0] if config.reference else {}
    support = find_support(config.regression)
    if support.warning:
        logger.warning(support.warning)
    verbosity, reason = resolve_verbosity(config, objectives, support.metrics, "answer_lengths" in features)
    if verbosity == LENGTH_OBJECTIVE:
        if "answer_lengths" not in features:
            raise ValueError(
                f"`--verbosity length` needs the answers' lengths, which {config.reference} do not hold: extract the "
                "reference features again with this package's `armorm extract`."
            )
        objectives = [*objectives, LENGTH_OBJECTIVE]
    result, n_reference = _decorrelation(config, features, weight, objectives, verbosity, reason)
    unreachable = [objectives[i] for i in result.unreachable]
    metrics = {
        "verbosity": verbosity,
        "verbosity_reason": reason,
        "reference_responses": n_reference,
        "penalties": dict(zip(objectives, result.penalties.tolist())),
        "spearman_before": dict(zip(objectives, result.correlations_before)),
        "spearman_after": dict(zip(objectives, result.correlations_after)),
        "unreachable": unreachable,
        "support_source": support.source,
        "warnings": [support.warning] if support.warning else [],
    }
    extra = {key: metrics[key] for key in ("spearman_after", "unreachable", "reference_responses", "verbosity_reason")}
    if verbosity == LENGTH_OBJECTIVE:
        extra["length_objective"] = LENGTH_OBJECTIVE
    save_transform(
        config.out, result.matrix, result.penalties, objectives, verbosity=verbosity,
        extra_metadata={"threshold": config.threshold, **extra},
    )  # fmt: skip
    inputs = {"regression": head_fingerprint(config.regression), **support.inputs}
    if config.reference:
        inputs["reference"] = [folder_fingerprint(folder) for folder in config.reference]
    return write_report(
        report_path("decorrelate", config.out),
        "decorrelate",
        config,
        inputs=inputs,
        outputs={"transform": head_fingerprint(config.out)},
        metrics=metrics,
    )


def _decorrelation(
    config: DecorrelateConfig,
    features: dict,
    weight: torch.Tensor,
    objectives: list[str],
    verbosity: str | None,
    reason: str,
) -> tuple[DecorrelationResult, int]:
    """The penalties and T for `verbosity` over the reference responses (T = I for none), and their number."""
    k = len(objectives)
    if verbosity is None:
        logger.warning("No decorrelation (%s).", reason)
        return DecorrelationResult(torch.zeros(k), torch.eye(k), [None] * k, [None] * k), 0
    if not features:
        raise ValueError(f"Decorrelating from `{verbosity}` needs reference features: pass `--reference`.")
    lengths = features["answer_lengths"] if verbosity == LENGTH_OBJECTIVE else None
    rewards = _reference_rewards(features, weight, objectives, config.regression, lengths)
    logger.info(
        "Decorrelating %d objectives from `%s` over %d reference responses (%s).", k, verbosity, len(rewards), reason
    )
    result = decorrelate(
        rewards, objectives.index(verbosity), config.threshold, config.tolerance, config.max_penalty,
        objectives=objectives,
    )  # fmt: skip
    return result, len(rewards)


def _reference_rewards(
    features: dict, weight: torch.Tensor, objectives: list[str], regression: str, lengths
) -> torch.Tensor:
    """r = W h of every reference response (and r_len with `lengths`), in float64: the bisection compares
    correlations at λ's 1e-3 apart. A reference pair the `preference` head was fitted on gets its out-of-fold
    reward, as in `armorm gate` (`conversion.preference.cross_fitted_rewards`). → (n, k)"""
    embeddings = reference_embeddings(features, {})
    if embeddings.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"The reference features have hidden size {embeddings.shape[-1]} but W of {regression} expects "
            f"{weight.shape[1]}: extract them with the backbone the regression was fitted on."
        )
    r = cross_fitted_rewards(features, weight, objectives, regression, dtype=torch.float64, answer_lengths=lengths)
    return r.reshape(-1, r.shape[-1])  # pairs: both answers of each, 2N rows
