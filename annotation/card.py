# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""`armorm annotate --push-to-hub REPO`: the annotations as one Hub dataset repository with two configurations.

    REPO/
      README.md                              the dataset card: source data, model, objectives, pair rule, counts
      scored/train-00000-of-00001.parquet    config `scored`: every input row with its scores
      pairs/train-00000-of-00001.parquet     config `pairs` (the default): TRL's preference layout

so `load_dataset(REPO, "pairs", split="train")` gives the DPO pairs and `load_dataset(REPO, "scored",
split="train")` the scored rows. The files go up in one commit through `huggingface_hub` (the token: `HF_TOKEN` or
the cached `hf auth login`).
"""

import logging
import tempfile
from pathlib import Path

import datasets
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from huggingface_hub.utils import validate_repo_id

from armorm_io.reports import command_line, file_name


logger = logging.getLogger(__name__)

__all__ = ["build_card", "push_annotations"]

CONFIGS = ("pairs", "scored")  # `pairs` first: the default configuration
PARQUET = "{config}/train-00000-of-00001.parquet"
RULES = {
    "best-worst": "the highest-scored answer of each prompt against the lowest (SimPO's and Online-RLHF's pairs)",
    "all": "every ordered pair of answers to a prompt",
    "none": "no pairs",
}


def build_card(config, report: dict, configs: list[str]) -> DatasetCard:
    """The dataset card of an annotation: where the data and the scores come from, and how the pairs were made."""
    counts = report["metrics"]["counts"]
    model, data = file_name(config.model), file_name(config.data)
    metadata = DatasetCardData(
        tags=["armorm", "reward-model", "preference", "dpo"],
        configs=[
            {
                "config_name": name,
                "data_files": [{"split": "train", "path": PARQUET.format(config=name)}],
                **({"default": True} if name == configs[0] else {}),
            }
            for name in configs
        ],
    )
    objectives = ", ".join(f"`{name}`" for name in report["objectives"])
    margin = f", more than {config.min_margin} apart" if config.min_margin else ""
    source = f"`{data}`" + (f" (configuration `{config.name}`)" if config.name else "") + f", split `{config.split}`"
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        "# Annotated with ArmoRM",
        "",
        f"Every candidate answer of {source} ({report['layout']} layout) scored by the ArmoRM reward model "
        f"`{model}` with `armorm annotate`.",
        "",
        f"* **Objectives** ({len(report['objectives'])}), the order of each candidate's `rewards`: {objectives}.",
        "* **Scores**: s = g(x) · (T r), one per candidate; `gating_output` is the prompt's gating weights g."
        + (
            " Normalized (`--normalize`): z = (s − mean) / std of the model's reference answers "
            f"(mean {statistics['mean']:.6g}, std {statistics['std']:.6g})."
            if (statistics := report.get("score_statistics"))
            else " Raw: not in [0, 1]; compare scores of one model."
        ),
        f"* **Pairs** (`--pairs {config.pairs}`): {RULES[config.pairs]}{margin}; ties are dropped.",
        f"* **Counts**: {counts['prompts']} prompts, {counts['candidates']} candidates, {counts['pairs']} pairs, "
        f"{counts['ties']} ties dropped, {counts['skipped_rows']} rows skipped.",
        "",
        "## Configurations",
        "",
        *(
            {
                "pairs": "* `pairs`: TRL's conversational preference layout (`prompt`, `chosen`, `rejected`, "
                "`score_chosen`, `score_rejected`), ready for `DPOTrainer`.",
                "scored": "* `scored`: every input row, with `scores`, `rewards` and `gating_output` (null for a "
                "row that was not scored).",
            }[name]
            for name in configs
        ),
        "",
        "## How it was made",
        "",
        "```bash",
        command_line("annotate", config, paths=file_name),
        "```",
        "",
    ]
    return DatasetCard("\n".join(lines))


def push_annotations(out: str | Path, config, report: dict):
    """Upload `out`'s `scored` and `pairs` (as parquet) with the dataset card to `config.push_to_hub`, in one
    commit; returns its `CommitInfo`."""
    repo_id = config.push_to_hub
    validate_repo_id(repo_id)
    out = Path(out)
    configs = [name for name in CONFIGS if (out / name).is_dir()]
    api = HfApi()
    with tempfile.TemporaryDirectory() as staging:
        for name in configs:
            path = Path(staging) / PARQUET.format(config=name)
            path.parent.mkdir(parents=True)
            datasets.load_from_disk(str(out / name)).to_parquet(str(path))
        build_card(config, report, configs).save(Path(staging) / "README.md")
        api.create_repo(repo_id, repo_type="dataset", private=config.private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=staging,
            commit_message=f"Annotate with {file_name(config.model)} (armorm annotate)",
        )
    logger.info("armorm annotate: pushed %s to %s", " and ".join(configs), info.commit_url)
    return info
