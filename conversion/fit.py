"""Stage 1: fit the multi-objective regression `r = W h` on rating features, one ridge per objective.

    armorm fit --features features/ratings --out regression.safetensors [--alphas 1e-4 ... 1e4] [--val-fraction 0.2]

Each objective is a ridge regression without intercept on the rows where its label exists; its α is the one of
`--alphas` with the lowest MSE on a seeded held-out split, and the final weight is refitted on all its labelled rows.
Writes `weight` (k, d), `alpha` (k,) and, next to it, the stage report `fit.json` (rows, validation MSE, Pearson,
Spearman per objective, at the chosen α). The regression file's metadata records `objectives` and, per objective,
the `support_metrics` (rows, held-out rows, Pearson, Spearman) that `armorm decorrelate` and `armorm gate` judge it by
(`conversion.support`).

The features are streamed: only the Gram statistics XᵀX, Xᵀy, yᵀy (float64) of each group of objectives that
share a label mask are kept, so memory is O(groups · d²) whatever the number of rows, and one eigendecomposition of
a group's training Gram matrix gives the validation MSE of every α at once. The result equals scikit-learn's
`Ridge(alpha, fit_intercept=False)` fitted on the same rows.

With `--preference --preference-pairs PAIR_FEATURES`, W gets one more row, the objective `preference`: a Bradley-Terry
score learned from those pairs, not from ratings, cross-fitted by prompt (`conversion.preference`); the file then also
holds its fold heads and the keys and folds of the pairs it was fitted on.
"""

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import linalg, stats
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from armorm_io.artifacts import head_fingerprint, save_regression
from armorm_io.features import folder_fingerprint, iter_shards, read_meta, shard_names
from armorm_io.pair_keys import held_out
from armorm_io.reports import report_path, write_report
from conversion.preference import PreferenceSettings, fit_preference
from conversion.support import support_metrics
from modeling_armorm.heads import PREFERENCE_OBJECTIVE, rewards
from modeling_armorm.settings import Location, normalize_locations


logger = logging.getLogger(__name__)

# The paper's grid: decades from 1e-4 to 1e4.
ALPHAS = tuple(10.0**e for e in range(-4, 5))
# Rows per Gram update: bounds the float64 copy of a block (4096 x 4096 float64 = 128 MB).
BLOCK_ROWS = 4096


def validation_mask(index: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """A row is held out when a seeded hash of its source `index` falls below `val_fraction` (`held_out`): the
    split is the same however the rows were sharded or ordered."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    return held_out(index, val_fraction, seed)


def label_groups(present: torch.Tensor) -> list[list[int]]:
    """Objectives grouped by identical label mask (columns of `present`, (N, k) bool), in order of first objective."""
    groups: dict[bytes, list[int]] = {}
    for j in range(present.shape[1]):
        groups.setdefault(np.packbits(present[:, j].numpy()).tobytes(), []).append(j)
    return list(groups.values())


@dataclass
class GramStats:
    """Sufficient statistics of least squares for m targets sharing rows X: XᵀX (d, d), Xᵀy (d, m), yᵀy (m,), n."""

    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    n: int = 0

    @classmethod
    def zeros(cls, d: int, m: int) -> "GramStats":
        return cls(np.zeros((d, d)), np.zeros((d, m)), np.zeros(m))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows `x` (n, d) and targets `y` (n, m), accumulated in float64."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        # `x.T @ x` on one C-contiguous buffer is a BLAS syrk in numpy: half the flops of a general product.
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += (y * y).sum(0)
        self.n += x.shape[0]

    def __add__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty, self.n + other.n)


def _ridge_path(gram: GramStats, alphas: np.ndarray) -> np.ndarray:
    """Ridge weights (d, a, m) for every α from one eigendecomposition: w(α) = Q diag(1 / (λ + α)) Qᵀ Xᵀy."""
    eigenvalues, q = np.linalg.eigh(gram.xtx)
    projected = q.T @ gram.xty  # (d, m)
    scaled = projected[:, None, :] / (eigenvalues[:, None, None] + alphas[None, :, None])  # (d, a, m)
    return (q @ scaled.reshape(len(eigenvalues), -1)).reshape(scaled.shape)


class HeldOutRidge:
    """Ridge without intercept, α chosen per target by held-out MSE, then refitted on train + validation rows.

    Works on `GramStats`, not on rows, so the data can be streamed. Learned state: `alpha_` (m,), `coef_` (m, d)
    refitted on all rows, `val_coef_` (m, d) fitted on the training rows at `alpha_` (what the validation metrics
    judge), `val_mse_` (m,) its validation MSE and `val_mse_path_` (a, m) that of every α.
    A tie (equal held-out MSE, or equal GCV) goes to the α listed first: the smallest on an ascending grid (`ALPHAS`).
    """

    def __init__(self, alphas):
        self.alphas = alphas

    def fit(self, train: GramStats, val: GramStats) -> "HeldOutRidge":
        # The d x d factorizations are latency-bound (eigh's tridiagonalization is BLAS-2): one BLAS thread runs them
        # several times faster than two, and avoids OpenBLAS's thread stalls on a busy machine (measured at d = 1024).
        with threadpool_limits(limits=1, user_api="blas"):
            return self._fit(train, val)

    def _fit(self, train: GramStats, val: GramStats) -> "HeldOutRidge":
        alphas = np.asarray(self.alphas, dtype=np.float64)
        if alphas.ndim != 1 or alphas.size == 0 or (alphas <= 0).any():
            raise ValueError(f"`alphas` must be a non-empty list of positive numbers, got {self.alphas}.")
        if alphas.size > 1 and (train.n == 0 or val.n == 0):
            return self._fit_by_gcv(train + val, alphas)
        self.selection_ = "held-out MSE"
        path = _ridge_path(train, alphas)  # (d, a, m)
        d, a, m = path.shape
        # Validation MSE from its Gram statistics: (yᵀy − 2 wᵀXᵀy + wᵀXᵀXw) / n, for every α and target at once.
        cross = np.einsum("dam,dm->am", path, val.xty)
        quadratic = np.einsum("dam,dam->am", path, (val.xtx @ path.reshape(d, -1)).reshape(d, a, m))
        with np.errstate(invalid="ignore", divide="ignore"):
            self.val_mse_path_ = (val.yty[None, :] - 2 * cross + quadratic) / val.n
        best = np.zeros(m, dtype=np.int64) if a == 1 else self.val_mse_path_.argmin(0)  # ties: the first α listed
        self.alpha_, self.val_mse_ = alphas[best], self.val_mse_path_[best, np.arange(m)]
        self.val_coef_ = path[:, best, np.arange(m)].T
        # The refit on all labelled rows needs only the chosen α (one or two per group): a Cholesky solve each,
        # (XᵀX + αI) w = Xᵀy, is several times cheaper than a second eigendecomposition.
        full = train + val
        self.coef_ = np.zeros((m, d))
        for alpha in np.unique(self.alpha_):
            targets = self.alpha_ == alpha
            system = full.xtx + alpha * np.eye(d)
            self.coef_[targets] = linalg.solve(system, full.xty[:, targets], assume_a="pos").T
        return self

    def _fit_by_gcv(self, full: GramStats, alphas: np.ndarray) -> "HeldOutRidge":
        """A label group too small to hold rows out (a few rated rows): α by generalized cross-validation on all of
        them, GCV(α) = n · RSS(α) / (n − df(α))², df(α) = Σ_j s_j / (s_j + α), from the same Gram statistics."""
        self.selection_ = "GCV (no held-out rows)"
        eigenvalues = np.linalg.eigvalsh(full.xtx)
        path = _ridge_path(full, alphas)  # (d, a, m)
        d, a, m = path.shape
        cross = np.einsum("dam,dm->am", path, full.xty)
        quadratic = np.einsum("dam,dam->am", path, (full.xtx @ path.reshape(d, -1)).reshape(d, a, m))
        rss = full.yty[None, :] - 2 * cross + quadratic  # (a, m)
        dof = (eigenvalues[:, None] / (eigenvalues[:, None] + alphas[None, :])).sum(0)  # (a,)
        with np.errstate(invalid="ignore", divide="ignore"):
            gcv = np.where((full.n - dof)[:, None] > 0, full.n * rss / (full.n - dof)[:, None] ** 2, np.inf)
        best = gcv.argmin(0)
        self.alpha_ = alphas[best]
        self.coef_ = self.val_coef_ = path[:, best, np.arange(m)].T
        self.val_mse_path_ = np.full((a, m), np.nan)
        self.val_mse_ = np.full(m, np.nan)
        return self


@dataclass
class RegressionFit:
    weight: torch.Tensor  # (k, d) float32
    alpha: torch.Tensor  # (k,) float64
    objectives: list[str]
    metrics: dict = field(default_factory=dict)


# Rows of the i-th features folder are keyed `index + i * FOLDER_STRIDE`, so each folder's split stays its own.
FOLDER_STRIDE = 1 << 40


def _as_folders(features) -> list[str]:
    return [features] if isinstance(features, (str, os.PathLike)) else list(features)


def _read_metas(folders: list[str]) -> tuple[list[dict], list[str], int]:
    """Each folder's meta, the union of their objectives (in order of first appearance) and the hidden size."""
    metas, objectives = [read_meta(f) for f in folders], []
    for folder, meta in zip(folders, metas):
        if meta.get("kind") != "ratings":
            raise ValueError(
                f"`{folder}` holds {meta.get('kind')!r} features; `fit` needs ratings (`armorm extract`)."
            )
        objectives += [o for o in meta.get("objectives") or [] if o not in objectives]
    sizes = {int(m["hidden_size"]) for m in metas}
    if len(sizes) != 1:
        raise ValueError(f"The features folders {folders} come from backbones of hidden sizes {sorted(sizes)}.")
    return metas, objectives, sizes.pop()


def _label_names(folder, meta: dict, k_folder: int) -> list[str]:
    names = list(meta.get("objectives") or [str(j) for j in range(k_folder)])
    if len(names) != k_folder:
        raise ValueError(f"meta.json of `{folder}` names {len(names)} objectives for {k_folder} label columns.")
    return names


def _read_rows(folders: list[str], metas: list[dict], objectives: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass: labels (N, K) over the union of objectives and keyed source index (N,) of every row, in
    folder then shard order, checksums verified. Extends `objectives` with the names of unnamed label columns."""
    parts, indices = [], []
    for i, (folder, meta) in enumerate(zip(folders, metas)):
        position = 0
        for shard in iter_shards(folder, keys=["labels", "index"]):
            if "labels" not in shard:
                raise ValueError(f"A shard of `{folder}` has no `labels` tensor: not a ratings features folder.")
            n, k_folder = shard["labels"].shape
            names = _label_names(folder, meta, k_folder)
            objectives += [name for name in names if name not in objectives]
            parts.append((shard["labels"].float(), [objectives.index(name) for name in names]))
            # A folder written without `index` counts rows in shard order, as `load_features` does.
            indices.append(shard.get("index", torch.arange(position, position + n)) + i * FOLDER_STRIDE)
            position += n
    labels = torch.full((sum(len(p) for p, _ in parts), len(objectives)), float("nan"))
    row = 0
    for part, columns in parts:
        labels[row : row + len(part), columns] = part
        row += len(part)
    return labels, torch.cat(indices)


def _row_blocks(folders: list[str], metas: list[dict], objectives: list[str], desc: str):
    """Yield (embeddings (n, d) float32, labels (n, K) float64, rows) blocks in the order of `_read_rows`.

    The embeddings stay float32 here: each consumer converts only the rows it uses.
    """
    position = 0
    total = sum(len(shard_names(f)) for f in folders)
    bar = tqdm(total=total, desc=desc, unit="shard")
    for folder, meta in zip(folders, metas):
        for shard in iter_shards(folder, keys=["embeddings", "labels"], verify=False):  # verified by `_read_rows`
            embeddings, folder_labels = shard["embeddings"], shard["labels"]
            columns = [objectives.index(name) for name in _label_names(folder, meta, folder_labels.shape[1])]
            labels = np.full((len(folder_labels), len(objectives)), np.nan)
            labels[:, columns] = folder_labels.double().numpy()
            for start in range(0, len(labels), BLOCK_ROWS):
                x, y = embeddings[start : start + BLOCK_ROWS], labels[start : start + BLOCK_ROWS]
                yield x.numpy(), y, slice(position + start, position + start + len(y))
            position += len(labels)
            bar.update(1)
    bar.close()


def fit_regression(features, *, alphas, val_fraction: float, seed: int) -> RegressionFit:
    """Load → compute: stream one or several ratings features folders twice (Gram statistics, then validation
    predictions). Several folders (datasets rating different objectives) are fitted as one table over the union of
    their objectives, a label missing wherever a folder lacks its column."""
    folders = _as_folders(features)
    folder = ", ".join(map(str, folders))
    metas, objectives, d = _read_metas(folders)
    labels, index = _read_rows(folders, metas, objectives)
    held_out = validation_mask(index, val_fraction, seed).numpy()  # (N,) in shard order
    k = labels.shape[1]
    infinite = torch.isinf(labels).any(1).nonzero().flatten()
    if len(infinite):
        row = int(index[infinite[0]])
        raise ValueError(
            f"Source row {row} of `{folder}` has an infinite label ({labels[infinite[0]].tolist()}); "
            "labels must be finite, NaN for missing: fix the data and re-extract."
        )
    present = ~labels.isnan()
    for j in np.flatnonzero(~present.any(0).numpy()):
        raise ValueError(f"Objective `{objectives[j]}` has no labelled row in `{folder}`; drop it from the data.")
    groups = label_groups(present)
    train = [GramStats.zeros(d, len(g)) for g in groups]
    val = [GramStats.zeros(d, len(g)) for g in groups]

    for x, y, rows in _row_blocks(folders, metas, objectives, "fit: Gram statistics"):
        block_held_out = held_out[rows]
        for g, group in enumerate(groups):
            labelled = ~np.isnan(y[:, group[0]])
            for stats_, split in ((train[g], labelled & ~block_held_out), (val[g], labelled & block_held_out)):
                if split.any():
                    stats_.update(x[split], y[split][:, group])

    weight, alpha, val_weight, val_mse = np.zeros((k, d)), np.zeros(k), np.zeros((k, d)), np.zeros(k)
    mse_path = np.zeros((len(alphas), k))
    selection = np.empty(k, dtype=object)
    for g, group in enumerate(groups):
        ridge = HeldOutRidge(alphas).fit(train[g], val[g])
        selection[group] = ridge.selection_
        weight[group], alpha[group], val_weight[group] = ridge.coef_, ridge.alpha_, ridge.val_coef_
        val_mse[group], mse_path[:, group] = ridge.val_mse_, ridge.val_mse_path_

    # Pearson and Spearman need each held-out prediction: a second, cheap pass (one (n, d) x (d, k) product a block).
    predictions, targets = [[] for _ in range(k)], [[] for _ in range(k)]
    if val_fraction > 0:
        for x, y, rows in _row_blocks(folders, metas, objectives, "fit: validation"):
            x, y = x[held_out[rows]].astype(np.float64), y[held_out[rows]]
            scores = rewards(torch.from_numpy(x), torch.from_numpy(val_weight)).numpy()  # r = W h, (n_val, k)
            for j in range(k):
                rows = ~np.isnan(y[:, j])
                predictions[j].append(scores[rows, j])
                targets[j].append(y[rows, j])

    metrics = {}
    for g, group in enumerate(groups):
        for j in group:
            pred, true = np.concatenate([np.zeros(0), *predictions[j]]), np.concatenate([np.zeros(0), *targets[j]])
            # A correlation needs two distinct values on each side; None says "undefined" in the JSON.
            defined = len(pred) > 1 and np.ptp(pred) > 0 and np.ptp(true) > 0
            metrics[objectives[j]] = {
                "rows": train[g].n + val[g].n,
                "train_rows": train[g].n,
                "val_rows": val[g].n,
                "alpha": float(alpha[j]),
                "alpha_selection": selection[j],
                "val_mse": float(val_mse[j]) if val[g].n else None,
                "pearson": float(stats.pearsonr(pred, true).statistic) if defined else None,
                "spearman": float(stats.spearmanr(pred, true).statistic) if defined else None,
                "val_mse_by_alpha": {f"{a:g}": float(mse_path[i, j]) for i, a in enumerate(alphas)}
                if val[g].n
                else {},
                "label_group": g,
            }
    return RegressionFit(torch.from_numpy(weight).float(), torch.from_numpy(alpha), objectives, metrics)


def format_metrics(metrics: dict) -> str:
    """The per-objective table that `armorm fit` prints."""

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    width = max(len("objective"), *(len(name) for name in metrics))
    lines = [f"{'objective':<{width}}  {'rows':>8}  {'alpha':>7}  {'val MSE':>9}  {'Pearson':>7}  {'Spearman':>8}"]
    for name, row in metrics.items():
        lines.append(
            f"{name:<{width}}  {row['rows']:>8}  {row['alpha']:>7g}  {number(row['val_mse'], '>9.5f')}  "
            f"{number(row['pearson'], '>7.4f')}  {number(row['spearman'], '>8.4f')}"
        )
    return "\n".join(lines)


@dataclass(kw_only=True)
class FitSettings(PreferenceSettings):
    """The knobs of `armorm fit` (the ones `armorm build` passes on as `--fit-<name>`), with those of the optional
    `preference` objective."""

    alphas: list[float] = field(
        default_factory=lambda: list(ALPHAS),
        metadata={"help": "Ridge penalties α to choose from (the paper's decades)."},
    )
    val_fraction: float = field(default=0.2, metadata={"help": "Share of the rated rows held out to choose α."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split (a hash of each row's source index)."})


@dataclass(kw_only=True)
class FitConfig(FitSettings):
    """`armorm fit`: what it reads and writes, and its settings."""

    features: list[Location] = field(metadata={"help": "One or more ratings features folders (`armorm extract`)."})
    out: Location = field(metadata={"help": "The regression file to write, e.g. `regression.safetensors`."})
    preference_pairs: list[Location] | None = field(
        default=None,
        metadata={
            "help": "Pairs features folder(s) the `preference` objective is learned from (with `--preference`)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)
        if self.preference and not self.preference_pairs:
            raise ValueError(
                "`--preference` learns from pairs: pass their features folders with `--preference-pairs`."
            )
        if self.preference_pairs and not self.preference:
            raise ValueError(
                "`--preference-pairs` is given but the `preference` objective is off: add `--preference`."
            )


ARGUMENTS = (FitConfig,)


def _add_preference(result: RegressionFit, config: FitConfig):
    """Append the `preference` objective's row w to W (`conversion.preference`) and its metrics: the pairs it was
    learned from and its out-of-fold pairwise accuracy stand where a rated objective has rows and correlations.
    Returns the fold heads, pair keys and folds to store (None for a head that was not fitted here)."""
    if PREFERENCE_OBJECTIVE in result.objectives:
        raise ValueError(
            f"The ratings already have an objective named `{PREFERENCE_OBJECTIVE}`, the name of the Bradley-Terry "
            "objective: rename that label column, or drop `--preference`."
        )
    fitted = fit_preference(config.preference_pairs, config, config.seed, result.weight.shape[1])
    result.weight = torch.cat([result.weight, fitted.weight[None]])
    result.alpha = torch.cat([result.alpha, torch.tensor([fitted.alpha], dtype=result.alpha.dtype)])
    result.objectives.append(PREFERENCE_OBJECTIVE)
    # Out-of-fold pairs stand where a rated objective has its held-out rows; it has no rating to correlate with.
    result.metrics[PREFERENCE_OBJECTIVE] = {
        "rows": fitted.metrics["pairs"],
        "val_rows": fitted.metrics["pairs"],
        "val_mse": None,
        "pearson": None,
        "spearman": None,
        "learned_from": "pairs",
        **fitted.metrics,
    }
    if fitted.fold_weights is None:
        return None
    return fitted.fold_weights, fitted.pair_keys, fitted.folds


def main(config: FitConfig | None = None, /, **kwargs) -> dict:
    """Load → compute → save: `config.out` (W, α, objective names) and its report `fit.json`, which it returns
    (`report["metrics"]["objectives"]`: rows and validation metrics per objective). Pass a `FitConfig`, or its
    fields as keywords."""
    config = config or FitConfig(**kwargs)
    alphas = [float(a) for a in config.alphas]
    result = fit_regression(config.features, alphas=alphas, val_fraction=config.val_fraction, seed=config.seed)
    folds = _add_preference(result, config) if config.preference else None
    backbone = read_meta(config.features[0]).get("backbone")
    save_regression(
        config.out,
        result.weight,
        result.alpha,
        result.objectives,
        extra_metadata={"backbone": backbone or ""},
        support_metrics=support_metrics(result.metrics),
        preference_folds=folds,
    )
    inputs = {"features": [folder_fingerprint(folder) for folder in config.features]}
    if config.preference_pairs:
        inputs["preference_pairs"] = [folder_fingerprint(folder) for folder in config.preference_pairs]
    report = write_report(
        report_path("fit", config.out),
        "fit",
        config,
        inputs=inputs,
        outputs={"regression": head_fingerprint(config.out)},
        metrics={"objectives": result.metrics},
    )
    logger.info("%s\nwrote %s and %s", format_metrics(result.metrics), config.out, report_path("fit", config.out))
    return report
