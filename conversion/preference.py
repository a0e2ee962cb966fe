"""The `preference` objective: a Bradley-Terry score r_pref = w · h, learned from preference pairs, not from ratings.

    armorm fit --features features/ratings --preference --preference-pairs features/pairs --out regression.safetensors

w is one more row of W, on the same feature h as the rated objectives, so it flows through `armorm decorrelate`
(decorrelated from verbosity like the others), `armorm gate`, `armorm assemble` and the model unchanged. It is either

* fitted here (`--preference-head fit`): a linear Bradley-Terry model without intercept on the pairs' features,
  P(chosen ≻ rejected) = σ(w · (h_c − h_r)), minimising Σ_pairs −log σ(w · (h_c − h_r)) + α/2 ‖w‖², α chosen by the
  held-out log-loss over K folds of the pairs grouped by prompt (a prompt's pairs in one fold); or
* the score head of a Bradley-Terry backbone (`armorm bt`), whose last hidden state h is (`--preference-head
  backbone`): allowed only when none of the pairs the gate trains on is among the pairs that backbone trained on.

Cross-fitting (the rule `armorm gate` and `armorm decorrelate` follow): no pair the gate trains on is scored by a head
fitted on that pair. Fold f's head w_f is fitted on the other folds; the regression file stores the fold heads (K, d)
and the key and fold of every fitted pair (`armorm_io.pair_keys`), and `cross_fitted_rewards` gives a fitted pair
w_f · h of its own fold's head f, every other row the final head w (fitted on all the pairs).
"""

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from armorm_io.artifacts import load_preference_folds
from armorm_io.features import load_pair_features
from armorm_io.pair_keys import held_out
from conversion.bt import TRAINED_PAIRS_NAME, trained_pairs_by_backbone
from modeling_armorm.heads import PREFERENCE_OBJECTIVE, chunked_rewards
from modeling_armorm.settings import SettingsGroup


logger = logging.getLogger(__name__)

__all__ = [
    "PreferenceFit",
    "PreferenceSettings",
    "backbone_head",
    "bradley_terry_path",
    "cross_fitted_rewards",
    "fit_preference",
    "prompt_folds",
]

# The paper's grid, as for the ridge penalties: decades from 1e-4 to 1e4.
PREFERENCE_ALPHAS = tuple(10.0**e for e in range(-4, 5))


@dataclass(kw_only=True)
class PreferenceSettings(SettingsGroup):
    """The knobs of the optional `preference` objective (`armorm fit`; `armorm build` passes them as `--fit-<name>`)."""

    preference: bool = field(
        default=False,
        metadata={
            "help": "Add the objective `preference`: a Bradley-Terry score w·h learned from the preference pairs "
            "(`--preference-pairs`), cross-fitted by prompt so the gate never sees a pair scored by a head fitted "
            "on it."
        },
    )
    preference_head: Literal["auto", "fit", "backbone"] = field(
        default="auto",
        metadata={
            "help": "Where w comes from: `fit` (a Bradley-Terry fit on the pairs' features), `backbone` (the score "
            "head of a Bradley-Terry backbone of `armorm bt`; refused when it trained on a pair the gate trains on), "
            "`auto` (`backbone` when allowed, else `fit`)."
        },
    )
    preference_folds: int = field(
        default=5, metadata={"help": "K: folds of the pairs, grouped by prompt, for the cross-fitted heads and α."}
    )
    preference_alphas: list[float] = field(
        default_factory=lambda: list(PREFERENCE_ALPHAS),
        metadata={"help": "L2 penalties α of the Bradley-Terry fit to choose from by held-out log-loss."},
    )
    preference_max_iter: int = field(
        default=100, metadata={"help": "Newton-Cholesky iterations of each Bradley-Terry fit (a few per α suffice)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.preference_head not in ("auto", "fit", "backbone"):
            raise ValueError(f"`preference_head` must be `auto`, `fit` or `backbone`, got {self.preference_head!r}.")
        if self.preference_folds < 2:
            raise ValueError(f"`preference_folds` must be >= 2 (cross-fitting), got {self.preference_folds}.")
        if not self.preference_alphas or any(a <= 0 for a in self.preference_alphas):
            raise ValueError(f"`preference_alphas` must be positive numbers, got {self.preference_alphas}.")


def prompt_folds(prompt_keys: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each pair's fold in 0..K−1 from the seeded hash of its prompt key (`held_out`): u < 1/K is fold 0, and so on.
    Every pair of a prompt lands in the same fold, however the pairs were sharded or ordered. (N,) int64"""
    # fold = #{j in 1..K−1 : u ≥ j/K}, with held_out(keys, j/K) = (u < j/K).
    return sum((~held_out(prompt_keys, j / folds, seed)).long() for j in range(1, folds))


def bradley_terry_path(differences: np.ndarray, alphas: list[float], max_iter: int) -> np.ndarray:
    """w(α) minimising Σ_i −log σ(w · x_i) + α/2 ‖w‖² over the differences x_i = h_c − h_r (n, d), without intercept,
    for every α of `alphas`. → (a, d), in the order of `alphas`.

    scikit-learn's logistic regression on both orders (x_i, 1) and (−x_i, 0) minimises ½‖w‖² + 2C Σ_i −log σ(w · x_i):
    the same minimiser at C = 1 / (2α). Newton-Cholesky steps (n ≫ d) from the largest α down, each fit starting from
    the previous one's w: a few steps per α instead of a cold start each (L-BFGS on raw features of scale 100 needs
    thousands)."""
    x = np.concatenate([differences, -differences]).astype(np.float64)
    y = np.concatenate([np.ones(len(differences)), np.zeros(len(differences))])
    model = LogisticRegression(
        fit_intercept=False, solver="newton-cholesky", max_iter=max_iter, tol=1e-8, warm_start=True
    )
    path = np.zeros((len(alphas), x.shape[1]))
    for a in sorted(range(len(alphas)), key=lambda a: -alphas[a]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.set_params(C=1.0 / (2.0 * alphas[a])).fit(x, y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            logger.warning(
                "The Bradley-Terry fit at α = %g did not converge in %d iterations: raise `--preference-max-iter`.",
                alphas[a], max_iter,
            )  # fmt: skip
        path[a] = model.coef_[0]
    return path


def _log_loss(w: np.ndarray, differences: np.ndarray) -> float:
    """Mean −log σ(w · x) over the pairs."""
    return float(np.logaddexp(0.0, -(differences @ w)).mean())


@dataclass
class PreferenceFit:
    """The learned `preference` head: `weight` (d,) = w; `alpha`; `fold_weights` (K, d) = w_f, each fitted without
    fold f; `pair_keys`, `folds` (M,) of the fitted pairs; `metrics` (pairs, out-of-fold accuracy, log-loss, ...)."""

    weight: torch.Tensor
    alpha: float
    fold_weights: torch.Tensor | None
    pair_keys: torch.Tensor | None
    folds: torch.Tensor | None
    metrics: dict


def _load_pairs(folders: list[str]) -> dict[str, torch.Tensor]:
    tensors, metas = load_pair_features(folders)
    if any(meta.get("kind", "pairs") != "pairs" for meta in metas) or tensors["embeddings"].ndim != 3:
        raise ValueError(
            f"`preference_pairs` {folders} must be pairs features folders (`armorm extract --kind pairs`)."
        )
    missing = [key for key in ("prompt_keys", "pair_keys") if key not in tensors]
    if missing:
        raise ValueError(
            f"The pairs features {folders} lack {missing}, which the cross-fitting of `preference` groups and finds "
            "the pairs by: extract them again with this package's `armorm extract`."
        )
    return tensors


def fit_preference(folders: list[str], settings: PreferenceSettings, seed: int, hidden_size: int) -> PreferenceFit:
    """Load the pairs features, choose `w` by `settings.preference_head` and, for a fitted head, cross-fit it."""
    tensors = _load_pairs(folders)
    d = tensors["embeddings"].shape[-1]
    if d != hidden_size:
        raise ValueError(
            f"The pairs features {folders} have hidden size {d}, the ratings {hidden_size}: extract both with the "
            "same backbone."
        )
    head = _backbone_head_or_reason(folders, tensors, settings)
    if isinstance(head, torch.Tensor):
        if head.shape != (d,):
            raise ValueError(
                f"The backbone's score head has shape {tuple(head.shape)}, the pairs' features {d} dimensions: "
                "extract the pairs with that backbone, or pass `--preference-head fit`."
            )
        return _evaluate_backbone_head(head, tensors)
    logger.info("preference: fitting a Bradley-Terry head on the pairs' features (%s).", head)
    fitted = _cross_fit(tensors, settings, seed)
    fitted.metrics["head_reason"] = head
    return fitted


def _cross_fit(tensors: dict[str, torch.Tensor], settings: PreferenceSettings, seed: int) -> PreferenceFit:
    differences = (tensors["embeddings"][:, 0] - tensors["embeddings"][:, 1]).double().numpy()  # (M, d) = h_c − h_r
    folds = prompt_folds(tensors["prompt_keys"], settings.preference_folds, seed)
    empty = [f for f in range(settings.preference_folds) if not (folds == f).any()]
    if empty:
        raise ValueError(
            f"Folds {empty} of the `preference` cross-fitting hold no pair ({len(differences)} pairs, "
            f"{len(set(tensors['prompt_keys'].tolist()))} prompts): lower `--preference-folds` or add pairs."
        )
    alphas = [float(a) for a in settings.preference_alphas]
    folds_np = folds.numpy()
    # Held-out log-loss of every α over the folds; the fold heads of the chosen α are the out-of-fold heads.
    fold_heads = np.zeros((len(alphas), settings.preference_folds, differences.shape[1]))
    loss = np.zeros(len(alphas))
    for f in range(settings.preference_folds):
        fold_heads[:, f] = bradley_terry_path(differences[folds_np != f], alphas, settings.preference_max_iter)
        for a in range(len(alphas)):
            loss[a] += _log_loss(fold_heads[a, f], differences[folds_np == f]) * (folds_np == f).sum()
    best = int(loss.argmin())  # ties: the first α listed
    # The final head on all the pairs: the path down to the chosen α, warm-started as for the folds.
    larger = [a for a in alphas if a >= alphas[best]]
    weight = bradley_terry_path(differences, larger, settings.preference_max_iter)[larger.index(alphas[best])]
    # w_f · (h_c − h_r) for each pair, with the head of its own fold.
    out_of_fold = np.einsum("md,md->m", differences, fold_heads[best][folds_np])
    metrics = {
        "pairs": len(differences),
        "prompts": len(set(tensors["prompt_keys"].tolist())),
        "head": "fit",
        "folds": settings.preference_folds,
        "alpha": alphas[best],
        "alpha_selection": f"held-out log-loss over {settings.preference_folds} prompt-grouped folds",
        "log_loss_by_alpha": {f"{a:g}": float(value / len(differences)) for a, value in zip(alphas, loss)},
        "pairwise_accuracy": float((out_of_fold > 0).mean()),
        "log_loss": float(loss[best] / len(differences)),
    }
    return PreferenceFit(
        torch.from_numpy(weight).float(), alphas[best], torch.from_numpy(fold_heads[best]).float(),
        tensors["pair_keys"].long(), folds, metrics,
    )  # fmt: skip


def _evaluate_backbone_head(weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> PreferenceFit:
    """The backbone's own head: nothing is fitted here, so every pair is scored out of sample."""
    margins = (tensors["embeddings"][:, 0] - tensors["embeddings"][:, 1]).double() @ weight.double()
    metrics = {
        "pairs": len(margins),
        "prompts": len(set(tensors["prompt_keys"].tolist())),
        "head": "backbone",
        "alpha": 0.0,
        "alpha_selection": "none: the score head of the Bradley-Terry backbone",
        "pairwise_accuracy": float((margins > 0).double().mean()),
        "log_loss": float(torch.nn.functional.softplus(-margins).mean()),
    }
    return PreferenceFit(weight.float(), 0.0, None, None, None, metrics)


# ---------------------------------------------------------------- the score head of a Bradley-Terry backbone


def backbone_head(folder: str | os.PathLike) -> torch.Tensor:
    """The score head w (d,) of a one-label sequence-classification checkpoint (`score.weight`, (1, d))."""
    found = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name == TRAINED_PAIRS_NAME:
            continue
        with safe_open(str(path), framework="pt") as f:
            found += [
                (key, f.get_tensor(key)) for key in f.keys() if key == "score.weight" or key.endswith(".score.weight")
            ]
    if len(found) != 1 or found[0][1].shape[0] != 1:
        raise ValueError(
            f"{folder} holds {len(found)} one-row `score.weight` tensors ({[k for k, _ in found]}), expected exactly "
            "one (a one-label sequence classifier of `armorm bt`): pass `--preference-head fit`."
        )
    return found[0][1][0].float()


def _backbone_head_or_reason(folders: list[str], tensors: dict, settings: PreferenceSettings) -> torch.Tensor | str:
    """The backbone's score head when `preference_head` asks for it and the data allows it, else why the head is
    fitted. `backbone` refused: no Bradley-Terry backbone, or one that trained on a pair the gate trains on."""
    if settings.preference_head == "fit":
        return "`--preference-head fit`"
    # The head scores these pairs only when every folder was extracted with one `armorm bt` output.
    by_backbone = trained_pairs_by_backbone(folders)
    folder, trained = next(iter(by_backbone.items())) if len(by_backbone) == 1 else (None, None)
    if trained is None:
        if settings.preference_head == "backbone":
            raise ValueError(
                f"`--preference-head backbone` needs pairs features extracted with a Bradley-Terry backbone of "
                f"`armorm bt` (a folder with `{TRAINED_PAIRS_NAME}`), not {folders}. Pass `--preference-head fit`."
            )
        return "the backbone is not a Bradley-Terry stage output"
    seen = torch.isin(tensors["pair_keys"], trained)
    if seen.any():
        # The gate trains on these pairs: a head that has seen them would score them in sample.
        reason = (
            f"{int(seen.sum())} of the {len(seen)} pairs the gate trains on are among the pairs the backbone "
            f"{folder} trained on (first pair key {int(tensors['pair_keys'][seen][0])})"
        )
        if settings.preference_head == "backbone":
            raise ValueError(
                f"`--preference-head backbone` refused: {reason}, so its score head would score them in sample. "
                "Pass `--preference-head fit` (cross-fitted on the pairs' features), or train the backbone on other "
                "pairs (`armorm bt`)."
            )
        return f"`auto`: {reason}"
    logger.info(
        "preference: the score head of the Bradley-Terry backbone %s (it trained on none of the pairs).", folder
    )
    return backbone_head(folder)


# ---------------------------------------------------------------- the rewards the later stages compute


def cross_fitted_rewards(
    features: dict[str, torch.Tensor],
    weight: torch.Tensor,
    objectives: list[str],
    regression: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    answer_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """r = W h of stored features (`chunked_rewards`), except that a pair the `preference` head was fitted on gets
    its out-of-fold reward w_f · h (f = its fold) in the `preference` column: no pair is scored by a head fitted on
    it. features: `embeddings` (N, 2, d) with `pair_keys` (N,) for pairs, or (N, d) rows of ratings (never fitted
    pairs). → (N, ..., k), (N, ..., k + 1) with `answer_lengths`."""
    r = chunked_rewards(features["embeddings"], weight, dtype, answer_lengths)
    folds = load_preference_folds(regression)
    if folds is None or features["embeddings"].ndim != 3:
        return r
    if "pair_keys" not in features:
        raise ValueError(
            f"The `preference` objective of {regression} is cross-fitted on pairs, but these pairs features hold no "
            "`pair_keys` to tell the fitted pairs: extract them again with this package's `armorm extract`."
        )
    fold_weights, fitted_keys, fitted_folds = folds
    order = torch.argsort(fitted_keys)
    sorted_keys = fitted_keys[order]
    position = torch.searchsorted(sorted_keys, features["pair_keys"]).clamp_max(len(sorted_keys) - 1)
    fitted = sorted_keys[position] == features["pair_keys"]  # (N,)
    if fitted.any():
        column = objectives.index(PREFERENCE_OBJECTIVE)
        fold = fitted_folds[order][position[fitted]]  # (n,)
        h = features["embeddings"][fitted].to(dtype)  # (n, 2, d)
        r[fitted, :, column] = torch.einsum("npd,nd->np", h, fold_weights.to(dtype)[fold])  # w_f · h, both answers
    return r
