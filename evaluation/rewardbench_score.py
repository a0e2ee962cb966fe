"""RewardBench v1 sections and overall score from a file of per-subset accuracies, printed as JSON.

    armorm rewardbench-score eval-set/RLHFlow/ArmoRM-Llama3-8B-v0.1.json [pref-sets/RLHFlow/ArmoRM-Llama3-8B-v0.1.json]

A results file is in the layout of allenai/reward-bench-results: the subsets' accuracies (fractions) at the top level,
with `model`, `model_type`, `chat_template` and the like beside them; `armorm evaluate`'s output (accuracies under
`subsets`) is read too. Several files (the `eval-set` and `pref-sets` results of one model) are merged. Keys that are
not RewardBench subsets are ignored. The sections are the count-weighted means of the official subset table (see
`evaluation.rewardbench`), Prior Sets the mean of its four sets, and the overall score their weighted mean.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.rewardbench import EXAMPLE_COUNTS, PRIOR_SETS, rewardbench_scores
from modeling_armorm.settings import Location, normalize_locations


logger = logging.getLogger(__name__)

__all__ = ["ARGUMENTS", "POSITIONAL", "RewardBenchScoreConfig", "main", "read_accuracies"]

# `armorm rewardbench-score FILE ...`: the files may be given without their flag.
POSITIONAL = "results"


@dataclass(kw_only=True)
class RewardBenchScoreConfig:
    """`armorm rewardbench-score`: the results files to score."""

    results: list[Location] = field(
        metadata={"help": "Results JSON file(s): subset accuracies at the top level (given first, the flag may go)."}
    )

    def __post_init__(self):
        normalize_locations(self)


ARGUMENTS = (RewardBenchScoreConfig,)


def read_accuracies(path: str) -> tuple[dict[str, float], dict]:
    """The RewardBench subset accuracies of one results file, and its other top-level values (`model`, ...)."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(payload, dict):
        raise ValueError(f"{path} holds a JSON {type(payload).__name__}, not an object of subset accuracies.")
    if isinstance(payload.get("subsets"), dict):  # `armorm evaluate`'s results
        accuracies = {name: entry.get("accuracy") for name, entry in payload["subsets"].items()}
    else:
        accuracies = payload
    subsets = {name: value for name, value in accuracies.items() if name in EXAMPLE_COUNTS or name in PRIOR_SETS}
    about = {key: value for key, value in payload.items() if isinstance(value, str)}
    return subsets, about


def main(config: RewardBenchScoreConfig | None = None, /, **kwargs) -> dict:
    """Read the files, print the sections and overall score as JSON (stdout) and return them."""
    config = config or RewardBenchScoreConfig(**kwargs)
    accuracies, about = {}, {}
    for path in config.results:
        found, info = read_accuracies(path)
        for name, value in found.items():
            if name in accuracies and accuracies[name] != value:
                raise ValueError(f"Subset `{name}` has two accuracies, {accuracies[name]} and {value} (in {path}).")
        accuracies.update(found)
        about = {**info, **about}
    if not accuracies:
        raise ValueError(
            f"No RewardBench subset accuracy in {', '.join(config.results)}: give files with keys such as "
            "`alpacaeval-easy`, `xstest-should-refuse`, `hep-python` or `anthropic_hhh` (fractions)."
        )
    scores = rewardbench_scores(accuracies)
    result = {key: about[key] for key in ("model", "model_type", "chat_template") if key in about}
    result.update(scores)
    result["subsets_read"] = len(accuracies)
    print(json.dumps(result, indent=2))
    if "Score" not in scores:
        logger.warning("No overall score: subsets of the four main sections are missing (see `missing`).")
    return result
