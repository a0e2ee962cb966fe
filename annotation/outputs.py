# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The outputs of `armorm annotate` from its shards: the `scored` columns, the pairs, the skipped rows.

A row is annotated with every candidate of its row or not at all: a candidate that has no score (too long, not
encodable, a non-finite score) skips its row, listed with the reason, and the row gets null `scores`, `rewards` and
`gating_output`. In `prompt_completion` data a row is one candidate, so the other candidates of its prompt stay.
"""

import hashlib
import json
import shutil
from pathlib import Path

import datasets

from annotation.pairs import make_pairs
from armorm_io.files import Fingerprint, file_sha256


__all__ = [
    "OUTPUT_COLUMNS",
    "OUTPUT_FEATURES",
    "PAIR_FEATURES",
    "assemble_outputs",
    "dataset_fingerprint",
    "save_dataset",
]

OUTPUT_COLUMNS = ("scores", "rewards", "gating_output")
FLOATS = datasets.List(datasets.Value("float64"))
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
PAIR_FEATURES = datasets.Features(
    prompt=MESSAGES,
    chosen=MESSAGES,
    rejected=MESSAGES,
    score_chosen=datasets.Value("float64"),
    score_rejected=datasets.Value("float64"),
)
# The types of the columns `scored` adds.
OUTPUT_FEATURES = {"scores": FLOATS, "rewards": datasets.List(FLOATS), "gating_output": FLOATS}


def assemble_outputs(table, candidates, skipped, results, rule: str, min_margin: float, scale=float):
    """The `scored` columns (one entry per input row), the pairs, the ties and every skipped row with its reason;
    `scale` maps a raw score to the score written (`--normalize`: z = (s − mean) / std)."""
    row_reasons = {entry.row: entry.reason for entry in skipped}
    answers = []  # (row, position in its row, score, rewards, gating) of every answer, in the order of `candidates`
    flat = iter(
        (tensors["score"][i], tensors["rewards"][i], tensors["gating_output"][i], record["reasons"].get(str(i)))
        for tensors, record in results
        for i in range(len(tensors["score"]))
    )
    for item in candidates:
        for a, row in enumerate(item.rows):
            position = item.rows[:a].count(row)
            score, rewards, gating, reason = next(flat)
            answers.append((row, position, score, rewards, gating))
            if reason is not None and row not in row_reasons:
                several = item.rows.count(row) > 1
                row_reasons[row] = f"candidate {position}: {reason}" if several else reason
    columns = {name: [None] * len(table) for name in OUTPUT_COLUMNS}
    for row, position, score, rewards, gating in answers:
        if row in row_reasons:
            continue
        if position == 0:
            columns["scores"][row], columns["rewards"][row] = [], []
            columns["gating_output"][row] = gating.double().tolist()  # every answer of a prompt shares its g
        columns["scores"][row].append(scale(float(score)))
        columns["rewards"][row].append(rewards.double().tolist())
    pairs, ties, answers = [], 0, iter(answers)
    for item in candidates:
        mine = [next(answers) for _ in item.answers]
        scores = [None if row in row_reasons else scale(float(score)) for row, _, score, _, _ in mine]
        made, tied = make_pairs(item.prompt, item.answers, scores, rule, min_margin)
        pairs += made
        ties += tied
    skipped = [{"row": row, "reason": reason} for row, reason in sorted(row_reasons.items())]
    return columns, pairs, ties, skipped


def save_dataset(dataset: datasets.Dataset, path: Path) -> None:
    """`save_to_disk` into a temporary folder, then in place of `path`: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # An empty dataset gets no data file unless one shard is asked for, and then cannot be loaded back.
    dataset.save_to_disk(str(tmp), num_shards=1 if len(dataset) == 0 else None)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def dataset_fingerprint(folder: Path) -> Fingerprint:
    """The sha256 of a saved dataset folder's file names and contents."""
    listing = [[p.name, file_sha256(p)] for p in sorted(folder.iterdir()) if p.is_file()]
    return Fingerprint(str(folder), hashlib.sha256(json.dumps(listing).encode()).hexdigest())
