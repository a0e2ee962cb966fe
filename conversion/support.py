"""When the rating data supports an objective: the floor `armorm decorrelate` applies to its verbosity objective and
`armorm gate` to every objective it gates, its settings, and where both stages find the numbers it reads.

Where the numbers come from (a documented rule, no hidden input):

1. `armorm fit` records each objective's support metrics (rated rows, held-out rows, held-out Pearson and Spearman)
   in the metadata of the regression file it writes (`support_metrics`). Both stages are given that file as a
   setting and record its content hash among their report's inputs, so these numbers are covered by it.
2. A regression file without them (written by armorm 0.1 or another tool): the `fit.json` beside it, only if it is
   the report of this very file (the output hash it records is the file's). The stage report then lists it among
   its inputs as `fit_report`, with its sha256.
3. Neither: no floor is applied. A warning names the file, and the stage report says so (`support_source`: null,
   and the warning among its `warnings`).
"""

import math
from dataclasses import dataclass, field

from armorm_io.artifacts import load_support_metrics
from armorm_io.files import Fingerprint, file_sha256
from armorm_io.reports import report_for, report_path
from modeling_armorm.settings import SettingsGroup


__all__ = [
    "MIN_SUPPORT_ROWS",
    "MIN_SUPPORT_Z",
    "SUPPORT_KEYS",
    "Support",
    "SupportSettings",
    "find_support",
    "heldout_correlation",
    "support_metrics",
    "unsupported_reason",
]

# A ridge fit on few rows of d-dimensional features can match its training labels and still predict noise: only
# held-out rows tell, and only if there are enough of them and their correlation with the labels is clearly above
# zero. So: at least 50 rated rows (the default 20 % split then holds out about 10, the fewest on which a correlation
# can be told from zero at all), and a held-out correlation at least 1.645 standard errors above zero (Fisher's z:
# se = 1 / sqrt(n_val − 3); a one-sided 5 % test; with 10 held-out rows that is r ≥ 0.58, with 60 r ≥ 0.21). The
# correlation is the larger of Pearson's and Spearman's: Spearman is blind to a binary objective (its labels are
# mostly ties), Pearson to a monotone but curved one.
MIN_SUPPORT_ROWS = 50
MIN_SUPPORT_Z = 1.645
# The per-objective metrics of `armorm fit` that `unsupported_reason` reads.
SUPPORT_KEYS = ("rows", "val_rows", "pearson", "spearman")


@dataclass(kw_only=True)
class SupportSettings(SettingsGroup):
    """The floor below which the rating data does not support an objective (`armorm decorrelate` refuses it as the
    verbosity objective, `armorm gate` leaves it out)."""

    min_objective_rows: int = field(
        default=MIN_SUPPORT_ROWS,
        metadata={
            "help": "An objective fitted on fewer rated rows is not supported by the data: `decorrelate` refuses it "
            "as the verbosity objective, `gate` leaves it out (0: no check)."
        },
    )
    min_objective_z: float = field(
        default=MIN_SUPPORT_Z,
        metadata={
            "help": "Neither is an objective whose held-out correlation with its labels is fewer standard errors "
            "above zero (negative: no check)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if math.isnan(self.min_objective_z):
            raise ValueError("`min_objective_z` is NaN; pass a number of standard errors (negative: no check).")


def heldout_correlation(metrics: dict) -> float | None:
    values = [metrics.get(key) for key in ("pearson", "spearman") if metrics.get(key) is not None]
    return max(values) if values else None


def unsupported_reason(name: str, metrics: dict | None, min_rows: int, min_z: float) -> str | None:
    """Why the data does not support objective `name` (from its `armorm fit` metrics), or None when it does."""
    if metrics is None:
        return None
    if metrics.get("pairwise_accuracy") is not None:
        return _unsupported_by_pairs(name, metrics, min_rows, min_z)
    rows, correlation, n_val = metrics.get("rows", 0), heldout_correlation(metrics), metrics.get("val_rows") or 0
    if rows < min_rows:
        return f"`{name}` is fitted on {rows} rated rows (fewer than {min_rows})"
    if min_z < 0:  # the correlation check turned off
        return None
    if correlation is None or n_val <= 3:
        return f"`{name}` has no held-out correlation with its labels ({n_val} held-out rows)"
    floor = math.tanh(min_z / math.sqrt(n_val - 3))
    if correlation < floor:
        return (
            f"`{name}` has a held-out correlation of {correlation:.3f} with its labels over {n_val} rows, below "
            f"{floor:.3f} ({min_z:g} standard errors above zero)"
        )
    return None


def _unsupported_by_pairs(name: str, metrics: dict, min_pairs: int, min_z: float) -> str | None:
    """An objective learned from pairs (`preference`) has no rating to correlate with: it is judged by its pairs and
    its out-of-fold pairwise accuracy, which must be `min_z` standard errors above chance (se = 0.5 / sqrt(n))."""
    pairs, accuracy = metrics.get("rows") or 0, metrics["pairwise_accuracy"]
    if pairs < min_pairs:
        return f"`{name}` is learned from {pairs} pairs (fewer than {min_pairs})"
    if min_z < 0:
        return None
    floor = 0.5 + min_z * 0.5 / math.sqrt(pairs)
    if accuracy < floor:
        return (
            f"`{name}` has an out-of-fold pairwise accuracy of {accuracy:.3f} over {pairs} pairs, below {floor:.3f} "
            f"({min_z:g} standard errors above chance)"
        )
    return None


def support_metrics(objectives: dict[str, dict]) -> dict[str, dict]:
    """The part of `armorm fit`'s per-objective metrics that `unsupported_reason` reads (`SUPPORT_KEYS`, and the
    out-of-fold `pairwise_accuracy` of an objective learned from pairs)."""
    return {
        name: {key: metrics.get(key) for key in SUPPORT_KEYS}
        | ({"pairwise_accuracy": metrics["pairwise_accuracy"]} if metrics.get("pairwise_accuracy") is not None else {})
        for name, metrics in objectives.items()
    }


@dataclass
class Support:
    """What the stages know about the data behind each objective of a regression file (see the module docstring).

    `metrics`: objective → `SUPPORT_KEYS` (None: unknown, no floor applied); `source`: the input they come from
    (`"regression"`, `"fit_report"` or None); `inputs`: what the stage report adds to its inputs; `warning`: what the
    stage logs and reports when there are none."""

    metrics: dict[str, dict] | None
    source: str | None
    inputs: dict[str, Fingerprint] = field(default_factory=dict)
    warning: str | None = None


def find_support(regression) -> Support:
    """The support metrics of the objectives of the regression file `regression`, by the rule of the module
    docstring."""
    metrics = load_support_metrics(regression)
    if metrics is not None:
        return Support(metrics, "regression")
    report = report_for("fit", regression, "regression")
    if report is not None:
        path = report_path("fit", regression)
        inputs = {"fit_report": Fingerprint(str(path), file_sha256(path))}
        return Support(support_metrics(report["metrics"]["objectives"]), "fit_report", inputs)
    return Support(
        None,
        None,
        warning=(
            f"{regression} records no support metrics (it was not written by this package's `armorm fit`) and no "
            f"`fit.json` beside it was written for it: the support floors (`--min-objective-rows`, "
            "`--min-objective-z`) are not applied. Refit it with `armorm fit` to apply them."
        ),
    )
