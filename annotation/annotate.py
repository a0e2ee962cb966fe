# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Annotate preference data with an ArmoRM: score every candidate answer, keep the best and the worst as DPO pairs.

    armorm annotate --model CKPT --data princeton-nlp/llama3-ultrafeedback-armorm --split train --out DIR
    armorm annotate --model CKPT --data gens.jsonl --out DIR --pairs all --min-margin 0.01 --push-to-hub USER/NAME
    torchrun --nproc-per-node 8 -m armorm_cli annotate --model CKPT --data gens.jsonl --out DIR

Data: a prompt with its candidate answers in the layouts people publish (`annotation.layouts`: SimPO's
`all_generated_responses`, `completions` lists, UltraFeedback's `instruction` + `completions[].response`, TRL
prompt-completion rows grouped by prompt, `chosen` / `rejected` pairs). Each conversation is encoded as the
`reward-scoring` pipeline encodes it and scored through `modeling_armorm.scoring.score_encoded`, a prompt's answers
together, so the shared-prefix path runs the prompt once: the scores are the pipeline's, one conversation at a time.
`--backend vllm` runs the same encoded conversations through vLLM's offline engine with this package's plugin.

Outputs, in `--out`:

* `scored/`: every input row (`datasets.load_from_disk`) plus `scores` (one per candidate of the row),
  `rewards` (per candidate, the k objectives' rewards r in the order of the report's `objectives`) and `gating_output`
  (the prompt's gating weights g); null for a row that was not scored.
* `pairs/`: TRL's conversational preference layout (`prompt`, `chosen`, `rejected`, `score_chosen`,
  `score_rejected`), made by `--pairs` (`annotation.pairs`): `best-worst` (default), `all` ordered pairs scoring more
  than `--min-margin` apart, or `none` (no `pairs/`).
* `annotate.json`: the stage report (settings, input hashes, counts of prompts, candidates, pairs, ties and skipped
  rows, every skipped row with its reason, tokens/s).
* `shards/`: the scores by chunk of prompts, named by content (`annotation.shards`): a rerun resumes, and ends with
  the files an uninterrupted run writes.

With `--normalize` the scores written, and compared to make the pairs (`--min-margin` included), are z = (s − mean) /
std of the checkpoint's `score_statistics` (a checkpoint without them is refused before anything is scored); the
shards keep the raw scores.

A row that cannot be annotated (no candidates, a candidate that is not text, a prompt and answer longer than
`--max-length` or the backbone's positions, a score that comes out NaN) is skipped with every candidate of its row and
listed in the report; the job never stops over one row. Under `torchrun` / `accelerate launch` the chunks are split
across the processes and rank 0 writes the outputs, identical to one process's.
"""

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
import torch.distributed as dist

from annotation.card import push_annotations
from annotation.layouts import LAYOUTS, Candidates, detect_layout, read_candidates
from annotation.outputs import (
    OUTPUT_COLUMNS,
    OUTPUT_FEATURES,
    PAIR_FEATURES,
    assemble_outputs,
    dataset_fingerprint,
    save_dataset,
)
from annotation.pairs import PAIR_RULES
from annotation.scorers import TransformersScorer, VllmScorer
from annotation.shards import chunk_key, load_shard, prune_shards, save_shard
from armorm_io.backbone import load_tokenizer
from armorm_io.checkpoints import load_model, model_fingerprint
from armorm_io.data import data_fingerprint, load_table
from armorm_io.distributed import init_distributed
from armorm_io.reports import write_report
from modeling_armorm.heads import normalize_scores
from modeling_armorm.scoring import Progress
from modeling_armorm.settings import (
    BackendSettings,
    BatchSettings,
    DeviceSettings,
    DtypeSettings,
    LengthSettings,
    Location,
    ScaleSettings,
    normalize_locations,
)


logger = logging.getLogger(__name__)

__all__ = ["ARGUMENTS", "AnnotateConfig", "AnnotateSettings", "annotate", "main"]

SCORED, PAIRS, SHARDS, REPORT = "scored", "pairs", "shards", "annotate.json"


@dataclass(kw_only=True)
class AnnotateSettings(BackendSettings, ScaleSettings, LengthSettings, BatchSettings, DeviceSettings, DtypeSettings):
    """The knobs of `armorm annotate`, with the shared backend, score scale, length policy, batch size, device and
    dtype."""

    split: str = field(default="train", metadata={"help": "Dataset split; slices such as `train[:1000]` work."})
    name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    layout: str | None = field(
        default=None,
        metadata={"help": f"The data's layout, one of {', '.join(LAYOUTS)} (default: detected from the columns)."},
    )
    pairs: Literal["best-worst", "all", "none"] = field(
        default="best-worst",
        metadata={
            "help": "Which preference pairs to write: the best against the worst answer of each prompt, every "
            "ordered pair, or none."
        },
    )
    min_margin: float = field(
        default=0.0, metadata={"help": "A pair's chosen answer must score more than this above the rejected one."}
    )
    shard_prompts: int = field(
        default=1024, metadata={"help": "Prompts per shard (the unit of resume and of the split across processes)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Score every prompt again, discarding the shards an earlier run left."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {', '.join(LAYOUTS)}, got {self.layout!r}.")
        if self.pairs not in PAIR_RULES:
            raise ValueError(f"`pairs` must be one of {', '.join(PAIR_RULES)}, got {self.pairs!r}.")
        if not (math.isfinite(self.min_margin) and self.min_margin >= 0):
            raise ValueError(f"`min_margin` must be a finite number >= 0, got {self.min_margin}.")
        if self.shard_prompts < 1:
            raise ValueError(f"`shard_prompts` must be at least 1, got {self.shard_prompts}.")


@dataclass(kw_only=True)
class AnnotateConfig(AnnotateSettings):
    """`armorm annotate`: what it reads and writes, and its settings."""

    model: Location = field(metadata={"help": "The ArmoRM checkpoint: a folder or a Hub id."})
    data: Location = field(metadata={"help": "Hub dataset id or a local json/jsonl/parquet/csv file."})
    out: Location = field(metadata={"help": "The folder to write `scored/`, `pairs/` and `annotate.json` in."})
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Also upload `scored` and `pairs` to this Hub dataset repository (`USER/NAME`)."},
    )
    private: bool = field(default=False, metadata={"help": "Create the `--push-to-hub` repository as private."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)
        if Path(self.out).is_file():
            raise ValueError(f"`out` ({self.out}) is a file; give the folder to write the annotations in.")


ARGUMENTS = (AnnotateConfig,)


# ----------------------------------------------------------------------------------------------------------------
# Scoring, chunk by chunk


def _chunks(candidates: list[Candidates], size: int) -> list[list[Candidates]]:
    return [candidates[start : start + size] for start in range(0, len(candidates), size)] or [[]]


def _score_chunk(scorer, chunk: list[Candidates], progress) -> tuple[dict, dict]:
    """The shard of one chunk: every answer's score, rewards and gating weights (NaN where it has none) and the
    reasons of those that have none."""
    flat = [[*item.prompt, {"role": "assistant", "content": answer}] for item in chunk for answer in item.answers]
    encoded = [scorer.encode(messages) for messages in flat]
    kept = [i for i, row in enumerate(encoded) if not isinstance(row, str)]
    reasons = {i: row for i, row in enumerate(encoded) if isinstance(row, str)}
    scored = scorer.score([encoded[i] for i in kept], progress)
    progress.update(len(reasons), 0)  # the answers that cannot be scored are done too
    k = len(scorer.objectives)
    tensors = {
        "score": torch.full((len(flat),), math.nan),
        "rewards": torch.full((len(flat), k), math.nan),
        "gating_output": torch.full((len(flat), k), math.nan),
    }
    for name in tensors:
        tensors[name][kept] = getattr(scored, name)
    reasons.update({kept[i]: reason for i, reason in scored.reasons.items()})
    tokens = sum(len(encoded[i]) for n, i in enumerate(kept) if n not in scored.reasons)
    return tensors, {"reasons": {str(i): reasons[i] for i in sorted(reasons)}, "tokens": tokens}


def annotate(scorer, candidates: list[Candidates], shards: str | Path, shard_prompts: int) -> tuple[list, dict]:
    """Score `candidates` (from `read_candidates`) chunk by chunk into content-keyed shards under `shards`, reusing
    those that exist; under a process group, rank r scores chunks r, r + W, …. Returns every chunk's
    `(tensors, record)` in order (on rank 0; the other ranks write only their shards) and this run's totals
    (`tokens`, `seconds`, `scored_chunks`, `chunks` and the chunks' `keys`)."""
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shards = Path(shards)
    shards.mkdir(parents=True, exist_ok=True)
    chunks = _chunks(candidates, shard_prompts)
    keys = [chunk_key(chunk, scorer.identity) for chunk in chunks]
    todo = [c for c in range(rank, len(chunks), world_size) if load_shard(shards, keys[c]) is None]
    total = sum(len(item.answers) for c in todo for item in chunks[c])
    progress = Progress(total, "Annotating", unit=" answers", disable=rank != 0)
    start, tokens = time.perf_counter(), 0
    try:
        for c in todo:
            tensors, record = _score_chunk(scorer, chunks[c], progress)
            save_shard(shards, keys[c], tensors, record)
            tokens += record["tokens"]
    finally:
        progress.close()
    run = {"tokens": tokens, "seconds": time.perf_counter() - start, "scored_chunks": len(todo)}
    runs = [run]
    if distributed:  # also waits for every rank's shards
        runs = [None] * world_size
        dist.all_gather_object(runs, run)
    results = [load_shard(shards, key) for key in keys] if rank == 0 else []
    missing = [c for c, result in enumerate(results) if result is None]
    if missing:
        raise RuntimeError(
            f"Chunks {missing} have no shard in `{shards}`: a process stopped early. Rerun the command."
        )
    seconds = max(r["seconds"] for r in runs)
    totals = {
        "tokens": sum(r["tokens"] for r in runs),
        "seconds": seconds,
        "scored_chunks": sum(r["scored_chunks"] for r in runs),
        "chunks": len(chunks),
        "keys": keys,
    }
    return results, totals


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an `--out` folder that holds files `armorm annotate` did not write; with `overwrite`, clear its own."""
    ours = {SCORED, PAIRS, SHARDS, REPORT}
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in ours):
        raise FileExistsError(
            f"`{out}` holds files that `armorm annotate` did not write; give an empty or new `--out` folder."
        )
    if overwrite:
        shutil.rmtree(out / SHARDS, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The stage


def main(config: AnnotateConfig | None = None, /, **kwargs) -> dict:
    """Load the checkpoint and the data, score every candidate, write `scored/`, `pairs/` and `annotate.json` in
    `config.out` (and upload them with `push_to_hub`); returns the report. Pass an `AnnotateConfig`, or its fields as
    keywords."""
    config = config or AnnotateConfig(**kwargs)
    rank, world_size, created_group, device = init_distributed(config.device)
    try:
        out = Path(config.out)
        if rank == 0:
            _check_out(out, config.overwrite)
        if world_size > 1:
            dist.barrier()
        inputs = {"model": model_fingerprint(config.model), "data": data_fingerprint(config.data)}
        table = load_table(config.data, config.split, config.name, sha256=inputs["data"].sha256)
        layout = config.layout or detect_layout(table.column_names)
        candidates, skipped = read_candidates(table, layout)
        scorer = _load_scorer(config, device, world_size)
        with contextlib.closing(scorer):  # the engine stops once every chunk is scored, or on an error
            statistics = scorer.config.score_statistics if config.normalize else None
            if config.normalize:
                normalize_scores(0.0, statistics)  # a checkpoint without them fails before anything is scored
            scorer.identity.update(
                model=inputs["model"].sha256 or f"hub id {config.model}",
                max_length=scorer.policy.max_length,
                truncate_prompt=config.truncate_prompt,
            )
            results, run = annotate(scorer, candidates, out / SHARDS, config.shard_prompts)
        report = None
        if rank == 0:
            report = _write_outputs(
                config, out, table, layout, candidates, skipped, results, run, scorer, inputs, statistics
            )
        if world_size > 1:
            dist.barrier()
        return report
    finally:
        if created_group:
            dist.destroy_process_group()


def _load_scorer(config: AnnotateConfig, device, world_size: int):
    """The checkpoint loaded on `device` (transformers), or in vLLM's engine."""
    tokenizer = load_tokenizer(config.model)
    options = {"max_length": config.max_length, "truncate_prompt": config.truncate_prompt}
    if config.backend == "vllm":
        engine_args = config.engine_arguments(config.model, config.dtype)
        rank_device = device if world_size > 1 else None  # under torchrun, each process its own engine
        return VllmScorer(config.model, tokenizer, engine_args=engine_args, rank_device=rank_device, **options)
    model = load_model(config.model, config.dtype, device)
    return TransformersScorer(
        model, tokenizer, batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens, **options
    )


def _write_outputs(config, out, table, layout, candidates, skipped, results, run, scorer, inputs, statistics) -> dict:
    """Rank 0's last step: `scored/`, `pairs/` and the report from every chunk's shard, the unused shards deleted,
    then the upload when asked for."""
    scale = (lambda s: normalize_scores(s, statistics)) if statistics is not None else float
    columns, pairs, ties, skipped = assemble_outputs(
        table, candidates, skipped, results, config.pairs, config.min_margin, scale
    )
    scored = table.remove_columns([name for name in OUTPUT_COLUMNS if name in table.column_names])
    if len(scored.column_names) < len(table.column_names):
        logger.warning("The data's own %s columns are replaced by this annotation's.", list(OUTPUT_COLUMNS))
    for name in OUTPUT_COLUMNS:
        scored = scored.add_column(
            name, columns[name], feature=OUTPUT_FEATURES[name], new_fingerprint=f"armorm-{name}"
        )
    save_dataset(scored, out / SCORED)
    outputs = {"scored": dataset_fingerprint(out / SCORED)}
    if config.pairs != "none":
        pair_columns = {name: [pair[name] for pair in pairs] for name in PAIR_FEATURES}  # none: still these columns
        save_dataset(datasets.Dataset.from_dict(pair_columns, features=PAIR_FEATURES), out / PAIRS)
        outputs["pairs"] = dataset_fingerprint(out / PAIRS)
    else:
        shutil.rmtree(out / PAIRS, ignore_errors=True)
    prune_shards(out / SHARDS, set(run["keys"]))

    counts = {
        "source_rows": len(table),
        "prompts": len(candidates),
        "candidates": sum(len(item.answers) for item in candidates),
        "scored_rows": sum(value is not None for value in columns["scores"]),
        "skipped_rows": len(skipped),
        "pairs": len(pairs),
        "ties": ties,
    }
    metrics = {
        "counts": counts,
        "tokens": sum(record["tokens"] for _, record in results),
        # This run's own work: a resumed run scores only the chunks it did not find.
        "run": {
            "chunks": run["chunks"],
            "chunks_scored": run["scored_chunks"],
            "tokens_scored": run["tokens"],
            "tokens_per_second": run["tokens"] / run["seconds"] if run["seconds"] > 0 else None,
        },
    }
    extra = {"layout": layout, "objectives": list(scorer.objectives), "score_statistics": statistics}
    extra["skipped"] = skipped
    report = write_report(out / REPORT, "annotate", config, inputs, outputs, metrics, extra=extra)
    logger.info(
        "armorm annotate: %d prompts, %d candidates, %d pairs (%d ties dropped), %d rows skipped -> %s",
        counts["prompts"],
        counts["candidates"],
        counts["pairs"],
        counts["ties"],
        counts["skipped_rows"],
        out,
    )
    if skipped:
        logger.warning(
            "%d rows were not annotated (listed under `skipped` in %s), e.g. row %d: %s",
            len(skipped),
            out / REPORT,
            skipped[0]["row"],
            skipped[0]["reason"],
        )
    if config.push_to_hub:
        push_annotations(out, config, report)
    return report
