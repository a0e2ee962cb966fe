"""The head files of the conversion pipeline: regression (W), transform (T) and gating safetensors.

Each file holds only its tensors; what it needs to be read (objective names, the verbosity objective, the gating
temperature) goes into the safetensors metadata, whose values are strings: a non-string value is stored as JSON and
parsed back. Every file also records `content_sha256`, the hash of its tensors and other metadata
(`armorm_io.files.tensors_sha256`): loading recomputes it, so a corrupted or edited head file is refused, and the
stage reports name their inputs by it. A file written by another tool without it is trusted.
"""

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from armorm_io.files import Fingerprint, atomic_write, tensors_sha256


__all__ = [
    "CONTENT_HASH",
    "SUPPORT_METRICS",
    "head_fingerprint",
    "load_gating",
    "load_preference_folds",
    "load_regression",
    "load_support_metrics",
    "load_transform",
    "save_gating",
    "save_regression",
    "save_transform",
]


def _encode(metadata: dict) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def _decode(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a plain string (backbone id, command line, ...)


CONTENT_HASH = "content_sha256"
# The metadata key of a regression file's per-objective support metrics (written by `armorm fit`).
SUPPORT_METRICS = "support_metrics"
# The tensors of a regression file's cross-fitted `preference` objective (written by `armorm fit --preference`).
PREFERENCE_FOLD_WEIGHTS = "preference_fold_weights"
PREFERENCE_PAIR_KEYS = "preference_pair_keys"
PREFERENCE_FOLDS = "preference_folds"


def _save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """Write the file atomically with its content hash in the metadata; returns that hash."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    encoded = _encode(metadata)
    encoded[CONTENT_HASH] = tensors_sha256(tensors, encoded)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=encoded))
    return encoded[CONTENT_HASH]


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the raw (string) metadata, with the content hash verified and removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = dict(f.metadata() or {})
    recorded = metadata.pop(CONTENT_HASH, None)
    if recorded is not None and (actual := tensors_sha256(tensors, metadata)) != recorded:
        raise ValueError(
            f"{path} is corrupt or was edited: its content hash is {actual}, but it records {recorded}. Rerun the "
            "stage that wrote it."
        )
    return tensors, metadata


def _load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, metadata = _read(path)
    return tensors, {key: _decode(value) for key, value in metadata.items()}


def head_fingerprint(path: str | os.PathLike) -> Fingerprint:
    """A head file's `Fingerprint`: its recorded (and verified) content hash, or one computed for a file without."""
    tensors, metadata = _read(path)
    return Fingerprint(str(path), tensors_sha256(tensors, metadata))


def _require(path, tensors: dict, names: tuple[str, ...], stage: str) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{path} lacks tensors {missing} (has {sorted(tensors)}); write it with `armorm {stage}`.")


def _objective_list(objectives, k: int) -> list[str]:
    objectives = [str(name) for name in objectives]
    if len(objectives) != k:
        raise ValueError(f"{len(objectives)} `objectives` for k = {k} rows/columns.")
    return objectives


# ---------------------------------------------------------------- regression: r = W h


def save_regression(
    path: str | os.PathLike,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    objectives: list[str],
    extra_metadata: dict | None = None,
    support_metrics: dict[str, dict] | None = None,
    preference_folds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> str:
    """`weight` (k, d) float32 = W, `alpha` (k,) = each objective's ridge penalty; metadata `objectives` and, when
    given, `support_metrics` (objective → the rows and held-out correlations `armorm decorrelate` and `armorm gate`
    judge it by, see `conversion.support`). `preference_folds`: the cross-fitted `preference` objective's fold heads
    (K, d) and the key and fold of each pair it was fitted on (M,), M ≥ 1 (`conversion.preference`)."""
    weight, alpha = torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(alpha, dtype=torch.float64)
    if weight.ndim != 2 or alpha.shape != (weight.shape[0],):
        raise ValueError(
            f"`weight` must be (k, d) and `alpha` (k,); got {tuple(weight.shape)} and {tuple(alpha.shape)}."
        )
    objectives = _objective_list(objectives, weight.shape[0])
    metadata = {**(extra_metadata or {}), "objectives": objectives}
    if support_metrics is not None:
        unknown = sorted(set(support_metrics) - set(objectives))
        if unknown:
            raise ValueError(f"`support_metrics` names {unknown}, which are not among the objectives {objectives}.")
        metadata[SUPPORT_METRICS] = support_metrics
    tensors = {"weight": weight, "alpha": alpha}
    if preference_folds is not None:
        fold_weights, pair_keys, folds = preference_folds
        if fold_weights.ndim != 2 or fold_weights.shape[1] != weight.shape[1] or pair_keys.shape != folds.shape:
            raise ValueError(
                f"`preference_folds` must be fold heads (K, {weight.shape[1]}) and pair keys and folds of one shape; "
                f"got {tuple(fold_weights.shape)}, {tuple(pair_keys.shape)} and {tuple(folds.shape)}."
            )
        tensors[PREFERENCE_FOLD_WEIGHTS] = fold_weights.float()
        tensors[PREFERENCE_PAIR_KEYS], tensors[PREFERENCE_FOLDS] = pair_keys.long(), folds.long()
    return _save(path, tensors, metadata)


def load_regression(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    tensors, metadata = _load(path)
    _require(path, tensors, ("weight", "alpha"), "fit")
    weight = tensors["weight"].float()
    objectives = metadata.get("objectives") or [str(i) for i in range(weight.shape[0])]
    return weight, tensors["alpha"], _objective_list(objectives, weight.shape[0])


def load_preference_folds(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The cross-fitted `preference` head of a regression file: fold heads (K, d), fitted pair keys and their folds
    (M,); None when the file has none (no `preference` objective, or the score head of a Bradley-Terry backbone)."""
    tensors, _ = _load(path)
    if PREFERENCE_FOLD_WEIGHTS not in tensors:
        return None
    _require(path, tensors, (PREFERENCE_PAIR_KEYS, PREFERENCE_FOLDS), "fit")
    return tensors[PREFERENCE_FOLD_WEIGHTS].float(), tensors[PREFERENCE_PAIR_KEYS], tensors[PREFERENCE_FOLDS]


def load_support_metrics(path: str | os.PathLike) -> dict[str, dict] | None:
    """The `support_metrics` a regression file records (objective → rows, val_rows, pearson, spearman), or None for a
    file without them (written by armorm 0.1 or another tool)."""
    _, metadata = _load(path)
    return metadata.get(SUPPORT_METRICS)


# ---------------------------------------------------------------- transform: r' = r T


def save_transform(
    path: str | os.PathLike,
    matrix: torch.Tensor,
    penalties: torch.Tensor,
    objectives: list[str],
    verbosity: str | None = None,
    extra_metadata: dict | None = None,
) -> str:
    """`reward_transform_matrix` (k, k) = T and `penalties` (k,) = λ; metadata `objectives` and `verbosity`, the name
    of the verbosity objective (absent when T = I)."""
    matrix, penalties = torch.as_tensor(matrix, dtype=torch.float32), torch.as_tensor(penalties, dtype=torch.float32)
    k = matrix.shape[0]
    if matrix.shape != (k, k) or penalties.shape != (k,):
        raise ValueError(
            f"`matrix` must be (k, k) and `penalties` (k,); got {tuple(matrix.shape)} and {tuple(penalties.shape)}."
        )
    metadata = {**(extra_metadata or {}), "objectives": _objective_list(objectives, k)}
    if verbosity is not None:
        if verbosity not in metadata["objectives"]:
            raise ValueError(
                f"`verbosity` must name one of the objectives {metadata['objectives']}, got {verbosity!r}."
            )
        metadata["verbosity"] = verbosity
    return _save(path, {"reward_transform_matrix": matrix, "penalties": penalties}, metadata)


def load_transform(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors, metadata = _load(path)
    _require(path, tensors, ("reward_transform_matrix", "penalties"), "decorrelate")
    return tensors["reward_transform_matrix"], tensors["penalties"], metadata


# ---------------------------------------------------------------- gating: g(h_x) = β softmax(MLP(h_x) / temperature)

_LAYER_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


def _check_gating(path, state_dict: dict, hidden_dim: int, n_hidden: int) -> None:
    expected = {f"layers.{i}.{p}" for i in range(n_hidden + 1) for p in ("weight", "bias")} | {"logit_scale"}
    if set(state_dict) != expected:
        raise ValueError(
            f"{path}: a gating network with n_hidden = {n_hidden} has tensors {sorted(expected)}, "
            f"got {sorted(state_dict)}. Pass the state dict of `ArmoRMGatingNetwork` (model.gating.state_dict())."
        )
    for i in range(n_hidden):
        if state_dict[f"layers.{i}.weight"].shape[0] != hidden_dim:
            raise ValueError(
                f"{path}: `layers.{i}.weight` has {state_dict[f'layers.{i}.weight'].shape[0]} rows, hidden_dim = {hidden_dim}."
            )


def save_gating(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    temperature: float,
    hidden_dim: int,
    n_hidden: int,
    extra_metadata: dict | None = None,
) -> str:
    """The gating state dict (`layers.{i}.weight|bias`, `logit_scale` = β); metadata temperature/hidden_dim/n_hidden."""
    _check_gating(path, state_dict, hidden_dim, n_hidden)
    metadata = {
        **(extra_metadata or {}),
        "temperature": float(temperature),
        "hidden_dim": int(hidden_dim),
        "n_hidden": int(n_hidden),
    }
    return _save(path, dict(state_dict), metadata)


def load_gating(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and its metadata; `hidden_dim` and `n_hidden` come from the shapes when the metadata lacks them."""
    state_dict, metadata = _load(path)
    layers = sorted({int(m.group(1)) for key in state_dict if (m := _LAYER_KEY.fullmatch(key))})
    if not layers or "logit_scale" not in state_dict:
        raise ValueError(f"{path} is not a gating file (tensors {sorted(state_dict)}); write it with `armorm gate`.")
    metadata.setdefault("n_hidden", len(layers) - 1)
    metadata.setdefault("hidden_dim", state_dict["layers.0.weight"].shape[0] if len(layers) > 1 else 0)
    if "temperature" not in metadata:
        raise ValueError(f"{path} lacks the `temperature` metadata; write it with `armorm gate` or `save_gating`.")
    metadata["temperature"] = float(metadata["temperature"])
    metadata["hidden_dim"], metadata["n_hidden"] = int(metadata["hidden_dim"]), int(metadata["n_hidden"])
    _check_gating(path, state_dict, metadata["hidden_dim"], metadata["n_hidden"])
    return state_dict, metadata
