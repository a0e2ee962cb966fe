"""Evaluate an ArmoRM checkpoint on preference data: accuracy per subset, RewardBench v1 / v2, objectives and gating.

    armorm evaluate --model CKPT --data allenai/reward-bench --split filtered --out results.json
    armorm evaluate --model CKPT --data allenai/reward-bench-2 --split test --out results-v2.json
    torchrun --nproc_per_node 8 -m armorm_cli evaluate --model CKPT --data pairs.jsonl --out results.json

Data: every pairs layout `armorm_io.data.load_pairs` reads (RewardBench's `prompt`/`chosen`/`rejected` strings with
`subset` and `id`, message lists with a `source` column, ...) and RewardBench 2's best-of-n layout (`prompt`, `chosen`
and `rejected` lists of answers, `num_correct`, `subset`, `id`). Each distinct conversation is scored once (the
chosen answer that several RewardBench 2 rows share, too) through `modeling_armorm.scoring`, the path of extraction
and of the TRL reward: the gating position comes from the rendering, the batches are length-sorted, a bar shows the
progress. The length policy is extraction's: a row longer than `--max-length` tokens is skipped, or with
`--truncate-prompt` loses its earlier prompt turns (every answer of the row the same ones); an answer is never cut.

A pair is right when the chosen answer scores strictly higher (a tie is wrong, so a pair whose two answers are the same
is scored and wrong, as RewardBench counts it; `skipped` holds only rows that cannot be scored, and a message names a
row "row 12 (id 'abc')"). In the best-of-n layout the chosen answer must beat every rejected one (a tie is wrong, where
RewardBench 2's script would share the credit), and the Ties subset gets RewardBench 2's own formula
(`evaluation.rewardbench`). What an interpretable reward model adds: the accuracy of each objective's reward r_i alone,
the mean gating weights g/β per subset, and a length-bias block (the share of rows whose chosen answer is the longer
one, and the accuracy on those vs. the others).

`--out` is one JSON file, also the stage's report (`command`, `settings`, `inputs` with content hashes, `versions`):
`subsets` ({name: {accuracy, count}}), `rewardbench` or `rewardbench2` (percent), `per_objective`, `gating`,
`length_bias`, `overall`, `rows` (every scored row), `skipped` (every row that could not be scored, with the reason)
and `truncated`. Under `torchrun` / `accelerate launch` each rank scores its share of the batches a one-process run
makes, and rank 0 writes the file, identical to a one-process run's.
"""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.distributed as dist

from armorm_io.artifacts import load_gating, load_regression, load_transform
from armorm_io.backbone import load_tokenizer
from armorm_io.checkpoints import load_model, model_fingerprint
from armorm_io.data import data_fingerprint, load_pairs, load_table
from armorm_io.distributed import init_distributed
from armorm_io.reports import write_report
from evaluation.rewardbench import (
    EXAMPLE_COUNTS,
    PRIOR_SETS,
    TIES,
    V2_SUBSETS,
    rewardbench2_scores,
    rewardbench_scores,
    row_credit,
    subset_accuracy,
)
from modeling_armorm import ArmoRMForRewardModeling, ArmoRMGatingNetwork
from modeling_armorm.heads import LENGTH_OBJECTIVE, chunked_rewards, chunked_transformed_rewards, pair_scores
from modeling_armorm.length_policy import ConversationEncoder
from modeling_armorm.scoring import (
    EncodedConversation,
    Progress,
    ScoreOutput,
    model_gating_pattern,
    objective_names,
    pad_token_id,
    score_encoded,
    scoring_steps,
)
from modeling_armorm.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    BatchSettings,
    DeviceSettings,
    DtypeSettings,
    LengthSettings,
    Location,
    normalize_locations,
)


logger = logging.getLogger(__name__)

__all__ = [
    "ARGUMENTS",
    "EvalData",
    "EvalRow",
    "EvaluateConfig",
    "EvaluateSettings",
    "ScoredRow",
    "evaluate",
    "evaluate_features",
    "load_eval_data",
    "main",
    "model_fingerprint",
    "score_rows",
    "summarize",
]

# The subset of rows whose data has no `subset` (or `source`) column.
DEFAULT_SUBSET = "all"


@dataclass(kw_only=True)
class EvaluateSettings(LengthSettings, BatchSettings, DeviceSettings, DtypeSettings):
    """The knobs of `armorm evaluate` (the ones `armorm build` passes on as `--evaluate-<name>`), with the shared
    length policy, batch size, device and dtype."""

    split: str = field(
        default="train",
        metadata={
            "help": "Dataset split (RewardBench: `filtered`, RewardBench 2: `test`); slices such as `train[:100]`."
        },
    )
    name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    subsets: list[str] | None = field(
        default=None, metadata={"help": "Only these subsets (space- or comma-separated; default: every subset)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.subsets is not None:
            self.subsets = [name for item in self.subsets for name in item.split(",") if name]


@dataclass(kw_only=True)
class EvaluateConfig(EvaluateSettings):
    """`armorm evaluate`: what it reads and writes, and its settings."""

    model: Location = field(metadata={"help": "The ArmoRM checkpoint: a folder or a Hub id."})
    data: Location = field(metadata={"help": "Hub dataset id or a local json/jsonl/parquet/csv file of pairs."})
    out: Location = field(metadata={"help": "The results JSON file to write."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)
        if Path(self.out).is_dir():
            raise ValueError(f"`out` ({self.out}) is a folder; give the results file's path, e.g. `results.json`.")


ARGUMENTS = (EvaluateConfig,)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class EvalRow:
    """One prompt and its answers: the `chosen` (correct) ones, then the `rejected`; a pair holds one of each."""

    id: object
    subset: str
    prompt: list[dict]
    chosen: list[str]
    rejected: list[str]
    index: int  # the row's position in the source data

    def conversations(self) -> list[list[dict]]:
        """Every answer as a full conversation, chosen first."""
        return [[*self.prompt, {"role": "assistant", "content": answer}] for answer in (*self.chosen, *self.rejected)]


@dataclass
class EvalData:
    """The rows to score, the rows that cannot be (`{"id", "index", "subset", "reason"}`) and the layout."""

    rows: list[EvalRow]
    skipped: list[dict]
    best_of_n: bool  # RewardBench 2's layout: lists of answers, a best-of-n credit and the Ties formula
    source_rows: int


def load_eval_data(
    data: str | os.PathLike,
    split: str = "train",
    name: str | None = None,
    subsets: Sequence[str] | None = None,
    *,
    sha256: str | None = None,
) -> EvalData:
    """Read pairs (any layout of `armorm_io.data.load_pairs`) or RewardBench 2's best-of-n rows, keeping `subsets`.
    `sha256`: the local data's hash as the results record it (`data_fingerprint`): read only if unchanged."""
    data = os.fspath(data)
    table = load_table(data, split, name, sha256=sha256)
    columns = table.column_names
    ids = list(table["id"]) if "id" in columns else None
    group = "subset" if "subset" in columns else "source" if "source" in columns else None
    groups = [DEFAULT_SUBSET if g is None else str(g) for g in table[group]] if group else None

    def about(index: int) -> dict:
        return {
            "id": ids[index] if ids is not None else index,
            "index": index,
            "subset": groups[index] if groups else DEFAULT_SUBSET,
        }

    best_of_n = _is_best_of_n(table)
    if best_of_n:
        rows, skipped = _read_best_of_n(table, about)
    else:
        # RewardBench scores a tie, and counts it wrong.
        pairs = load_pairs(data, split, name, keep_ties=True, sha256=sha256)
        rows = [
            EvalRow(
                prompt=chosen[:-1],
                chosen=[chosen[-1]["content"]],
                rejected=[rejected[-1]["content"]],
                **about(index),
            )
            for chosen, rejected, index in zip(pairs.chosen, pairs.rejected, pairs.index)
        ]
        skipped = [{**about(entry["index"]), "reason": entry["reason"]} for entry in pairs.skipped]
    if subsets:
        available = sorted({row.subset for row in rows} | {entry["subset"] for entry in skipped})
        unknown = [s for s in subsets if s not in available]
        if unknown:
            raise ValueError(f"`subsets` {unknown} are not in {data!r}; its subsets are {available}.")
        rows = [row for row in rows if row.subset in subsets]
        skipped = [entry for entry in skipped if entry["subset"] in subsets]
    return EvalData(rows, skipped, best_of_n, len(table))


def _row_name(entry: dict) -> str:
    """How every message names a row of the data: "row 12 (id 'abc')", its 0-based index and its id when the data
    has an `id` column (without one, a row's id is its index)."""
    if entry["id"] == entry["index"]:
        return f"row {entry['index']}"
    return f"row {entry['index']} (id {entry['id']!r})"


def _is_best_of_n(table: datasets.Dataset) -> bool:
    """RewardBench 2's layout: `chosen` and `rejected` hold lists of answer strings (not message lists)."""
    if "prompt" not in table.column_names or "rejected" not in table.column_names:
        return False
    inner = getattr(table.features.get("chosen"), "feature", None)
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def _read_best_of_n(table: datasets.Dataset, about) -> tuple[list[EvalRow], list[dict]]:
    columns = [c for c in ("prompt", "chosen", "rejected", "num_correct") if c in table.column_names]
    rows, skipped = [], []
    index = 0
    for batch in table.select_columns(columns).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in columns)):
            row = dict(zip(columns, values))
            where = about(index)
            try:
                prompt = _prompt_messages(row["prompt"])
                chosen, rejected = _answers(row["chosen"], "chosen"), _answers(row["rejected"], "rejected")
                _check_num_correct(row.get("num_correct"), len(chosen))
                if where["subset"] == TIES and not str(where["id"]).startswith(("ref:", "tied:")):
                    raise ValueError(f"a Ties row's id must be `ref:<prompt>` or `tied:<prompt>`, got {where['id']!r}")
            except (ValueError, TypeError) as error:
                skipped.append({**where, "reason": str(error)})
            else:
                rows.append(EvalRow(prompt=prompt, chosen=chosen, rejected=rejected, **where))
            index += 1
    return rows, skipped


def _prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("`prompt` is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [{"role": m.get("role"), "content": m["content"]} for m in prompt]
    raise ValueError(f"`prompt` must be a string or a list of messages, got {prompt!r:.80}")


def _check_num_correct(value, n: int) -> None:
    """RewardBench 2's `num_correct` (when present) counts the answers of `chosen`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ValueError(f"`num_correct` is {value!r}, not an int: it counts the answers of `chosen`")
    if value != n:
        raise ValueError(f"`num_correct` is {int(value)} but `chosen` holds {n} answers")


def _answers(value, column: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{column}` holds no answer")
    for j, answer in enumerate(value):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answer {j} of `{column}` is empty or not a string: no final answer to score")
    return list(value)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ScoredRow:
    """A row's scores s, raw rewards r (n, k) of its chosen and rejected answers, the prompt's gating weights g/β
    (k,) and, when known, each answer's length in tokens."""

    id: object
    subset: str
    chosen_scores: list[float]
    rejected_scores: list[float]
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    gating: np.ndarray
    chosen_lengths: list[int] | None = None
    rejected_lengths: list[int] | None = None


def score_rows(
    model: ArmoRMForRewardModeling,
    tokenizer,
    rows: Sequence[EvalRow],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    truncate_prompt: bool = False,
    max_batch_tokens: int | None = None,
) -> tuple[list[ScoredRow], list[dict], list[dict], dict]:
    """Score every answer of `rows`, each distinct conversation once; returns the scored rows, the skipped ones
    (`{"id", "index", "subset", "reason"}`), the truncated ones and counts. Every rank of a process group calls it
    and gets the whole result."""
    # The backbone's positions bind too (`extract`'s policy): a row past them is skipped, never scored out of range.
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    pattern = model_gating_pattern(model, tokenizer)
    encoder = ConversationEncoder(tokenizer, max_length, truncate_prompt, position_limit=limit, pattern=pattern)
    encoder.encoder = _EncodeOnce(encoder.encoder)
    distinct: dict[tuple, int] = {}
    conversations: list[EncodedConversation] = []
    kept, skipped, truncated = [], [], []
    for row, encoded in zip(rows, encoder.encode([row.conversations() for row in rows])):
        where = {"id": row.id, "index": row.index, "subset": row.subset}
        if isinstance(encoded, str):
            skipped.append({**where, "reason": encoded})
            continue
        if encoded.dropped_turns:
            truncated.append({**where, "dropped_turns": encoded.dropped_turns})
        positions = []
        for side in encoded.sides:
            key = (side.gating_position, tuple(side.input_ids))
            if key not in distinct:
                distinct[key] = len(conversations)
                conversations.append(side)
            positions.append(distinct[key])
        kept.append((row, positions))

    outputs = _score_distinct(model, conversations, batch_size, pad_token_id(tokenizer), max_batch_tokens)
    scored = []
    for row, positions in kept:
        n = len(row.chosen)
        g = outputs.gating_output[positions[0]].double().numpy()  # every answer shares the prompt, hence g
        lengths = [conversations[i].answer_length for i in positions]  # n, as the length objective counts it
        scored.append(
            ScoredRow(
                id=row.id,
                subset=row.subset,
                chosen_scores=outputs.score[positions[:n]].tolist(),
                rejected_scores=outputs.score[positions[n:]].tolist(),
                chosen_rewards=outputs.rewards[positions[:n]].double().numpy(),
                rejected_rewards=outputs.rewards[positions[n:]].double().numpy(),
                gating=g / g.sum(),  # g/β: softmax weights sum to 1, so Σ g = β
                chosen_lengths=lengths[:n],
                rejected_lengths=lengths[n:],
            )
        )
    counts = {
        "conversations": len(conversations),
        "answers": sum(len(positions) for _, positions in kept),
        "tokens": sum(len(c) for c in conversations),
    }
    return scored, skipped, truncated, counts


class _EncodeOnce:
    """A `ChatEncoder` that renders and tokenizes each distinct conversation once (the rows of a pairs file or of
    RewardBench 2 share answers); the encodings it returns are never modified."""

    def __init__(self, encoder):
        self.encoder, self.done = encoder, {}

    def encode(self, messages, where: str = "the conversation") -> EncodedConversation:
        key = json.dumps(messages, ensure_ascii=False)
        if key not in self.done:
            self.done[key] = self.encoder.encode(messages, where)
        return self.done[key]


def _score_distinct(
    model, conversations: list[EncodedConversation], batch_size: int, pad_id: int, max_batch_tokens: int | None = None
) -> ScoreOutput:
    """`score_encoded` over the conversations; under a process group, rank r scores steps r, r + W, … of the steps
    one process would run (`scoring_steps`: the same rows padded together, so the same numbers) and every rank gets
    all."""
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    steps = scoring_steps(model, conversations, batch_size, max_batch_tokens=max_batch_tokens)[rank::world_size]
    mine = [i for step in steps for i in step]
    progress = Progress(len(mine), "Scoring", unit=" conversations", disable=rank != 0)
    try:
        # One step at a time: `score_encoded` runs exactly that step again.
        outputs = [
            score_encoded(
                model,
                [conversations[i] for i in step],
                batch_size,
                pad_id,
                progress,
                max_batch_tokens=max_batch_tokens,
            )
            for step in steps
        ]
    finally:
        progress.close()
    share = (
        {
            key: torch.cat([getattr(out, key) for out in outputs])
            for key in ("score", "rewards", "gating_output", "coefficients")
        }
        if outputs
        else {}
    )
    parts = [(mine, share)]
    if distributed:
        parts = [None] * world_size
        dist.all_gather_object(parts, (mine, share))
    # Back to the conversations' order: each share comes in its batches' order.
    k = model.config.num_objectives
    full = {
        "score": torch.zeros(len(conversations)),
        **{key: torch.zeros(len(conversations), k) for key in ("rewards", "gating_output", "coefficients")},
    }
    for indices, tensors in parts:
        for key, value in tensors.items():
            full[key][indices] = value
    return ScoreOutput(**full)


# ----------------------------------------------------------------------------------------------------------------
# The results


def _row_credit(row: ScoredRow, values, best_of_n: bool) -> float:
    """A row's credit from `values(row) -> (chosen values, rejected values)`; a Ties row (its subset has a formula of
    its own) counts 1 when every correct answer outscores every incorrect one."""
    chosen, rejected = values(row)
    if best_of_n and row.subset == TIES:
        return float(min(chosen) > max(rejected))
    return row_credit(chosen, rejected, best_of_n)


def _scores(row: ScoredRow) -> tuple[list[float], list[float]]:
    return row.chosen_scores, row.rejected_scores


def _objective(j: int):
    """The rows' values as objective j's reward r_j alone."""
    return lambda row: (row.chosen_rewards[:, j].tolist(), row.rejected_rewards[:, j].tolist())


def _subset_score(subset: str, rows: list[ScoredRow], values, best_of_n: bool) -> float:
    return subset_accuracy(subset, [(row.id, *values(row)) for row in rows], best_of_n)


def _length_block(rows: list[ScoredRow], credits: list[float]) -> dict:
    longer = [min(row.chosen_lengths) > max(row.rejected_lengths) for row in rows]
    chosen_longer = [c for c, flag in zip(credits, longer) if flag]
    others = [c for c, flag in zip(credits, longer) if not flag]
    return {
        "chosen_longer_share": float(np.mean(longer)),
        "chosen_longer": {
            "count": len(chosen_longer),
            "accuracy": float(np.mean(chosen_longer)) if chosen_longer else None,
        },
        "chosen_not_longer": {"count": len(others), "accuracy": float(np.mean(others)) if others else None},
    }


def summarize(
    scored: Sequence[ScoredRow],
    objectives: Sequence[str],
    best_of_n: bool = False,
    skipped: Sequence[dict] = (),
    truncated: Sequence[dict] = (),
) -> dict:
    """The results dict (see the module docstring) from scored rows: accuracy per subset (a fraction), RewardBench v1
    sections or RewardBench 2 subsets (percent) when their subsets are present, per-objective accuracy, mean gating
    weights, length bias (when the rows carry lengths), and every row."""
    scored = list(scored)
    by_subset: dict[str, list[ScoredRow]] = {}
    for row in scored:
        by_subset.setdefault(row.subset, []).append(row)

    subsets = {
        name: {"accuracy": _subset_score(name, rows, _scores, best_of_n), "count": len(rows)}
        for name, rows in by_subset.items()
    }
    credits = [_row_credit(row, _scores, best_of_n) for row in scored]
    results: dict = {"layout": "best-of-n" if best_of_n else "pairs", "objectives": list(objectives)}
    results["overall"] = {
        "accuracy": float(np.mean(credits)) if scored else None,
        "count": len(scored),
        "per_objective": {
            name: float(np.mean([_row_credit(row, _objective(j), best_of_n) for row in scored])) if scored else None
            for j, name in enumerate(objectives)
        },
        "gating": _mean_gating(scored, objectives),
    }
    results["subsets"] = subsets
    accuracies = {name: entry["accuracy"] for name, entry in subsets.items()}
    if best_of_n and any(name in V2_SUBSETS for name in subsets):
        results["rewardbench2"] = rewardbench2_scores(accuracies)
    if not best_of_n and any(name in EXAMPLE_COUNTS or name in PRIOR_SETS for name in subsets):
        results["rewardbench"] = rewardbench_scores(accuracies)
    results["per_objective"] = {
        name: {subset: _subset_score(subset, rows, _objective(j), best_of_n) for subset, rows in by_subset.items()}
        for j, name in enumerate(objectives)
    }
    results["gating"] = {subset: _mean_gating(rows, objectives) for subset, rows in by_subset.items()}
    if scored and all(row.chosen_lengths is not None for row in scored):
        results["length_bias"] = {
            "measure": "answer tokens; the chosen answer is the longer one when it is longer than every rejected one",
            **_length_block(scored, credits),
            "subsets": {
                subset: _length_block(rows, [_row_credit(row, _scores, best_of_n) for row in rows])
                for subset, rows in by_subset.items()
            },
        }
    results["rows"] = [_row_entry(row, credit, best_of_n) for row, credit in zip(scored, credits)]
    results["skipped"] = list(skipped)
    results["truncated"] = list(truncated)
    return results


def _mean_gating(rows: Sequence[ScoredRow], objectives: Sequence[str]) -> dict[str, float]:
    if not rows:
        return {}
    mean = np.mean([row.gating for row in rows], axis=0)
    return {name: float(mean[j]) for j, name in enumerate(objectives)}


def _row_entry(row: ScoredRow, credit: float, best_of_n: bool) -> dict:
    entry = {"id": row.id, "subset": row.subset}
    if best_of_n:
        return {**entry, "chosen_scores": row.chosen_scores, "rejected_scores": row.rejected_scores, "credit": credit}
    return {
        **entry,
        "chosen_score": row.chosen_scores[0],
        "rejected_score": row.rejected_scores[0],
        "correct": credit == 1,
    }


def evaluate(
    model: ArmoRMForRewardModeling,
    tokenizer,
    data: EvalData,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    truncate_prompt: bool = False,
    max_batch_tokens: int | None = None,
) -> dict:
    """Score `data` (from `load_eval_data`) with a loaded ArmoRM and its tokenizer; returns the results dict."""
    scored, skipped, truncated, counts = score_rows(
        model,
        tokenizer,
        data.rows,
        batch_size=batch_size,
        max_length=max_length,
        truncate_prompt=truncate_prompt,
        max_batch_tokens=max_batch_tokens,
    )
    skipped = sorted([*data.skipped, *skipped], key=lambda entry: entry["index"])
    objectives = objective_names(model.config)
    results = summarize(scored, objectives, data.best_of_n, skipped, truncated)
    counts = {
        "source_rows": data.source_rows,
        "rows": len(scored),
        "skipped": len(skipped),
        "truncated": len(truncated),
        **counts,
    }
    return {"counts": counts, **results}


def evaluate_features(
    features: dict[str, torch.Tensor],
    regression: str | os.PathLike,
    transform: str | os.PathLike,
    gating: str | os.PathLike,
    subsets: Sequence[str] | None = None,
    ids: Sequence | None = None,
) -> dict:
    """The results dict from stored pair features (`armorm_io.features.load_features`) and head files, without a
    forward pass: s = g(h_x) · (W h T) for both answers (`modeling_armorm.heads`), raw r = W h (and the length objective
    r_len = log(1 + n) when the transform has it), g/β from the gating file.

    `subsets` and `ids` (default: the features' `index`) align with the feature rows; the features' `answer_lengths`
    (each answer's tokens, written by `armorm extract`) give the length-bias block.
    """
    weight, _, objectives = load_regression(regression)
    matrix, _, transform_meta = load_transform(transform)
    state_dict, meta = load_gating(gating)
    lengths = features.get("answer_lengths")  # (N, 2) tokens after the gating position
    if transform_meta.get("length_objective"):
        if lengths is None:
            raise ValueError(f"{transform} decorrelates from the answer's length: the features need `answer_lengths`.")
        objectives = [*objectives, LENGTH_OBJECTIVE]
    gated = meta.get("gated_objectives")
    network = ArmoRMGatingNetwork(
        weight.shape[1], len(objectives), meta["hidden_dim"], meta["n_hidden"], meta["temperature"],
        None if gated is None else [objectives.index(name) for name in gated],
    )  # fmt: skip
    network.load_state_dict(state_dict)  # strict: every tensor name and shape must match
    with_length = lengths if LENGTH_OBJECTIVE in objectives else None
    with torch.no_grad():
        h, h_x = features["embeddings"], features["prompt_embeddings"].float()  # (N, 2, d), (N, d)
        r_t = chunked_transformed_rewards(h, weight, matrix, answer_lengths=with_length)  # (N, 2, k)
        s = pair_scores(network.eval(), h_x, r_t).double()  # (N, 2)
        r = chunked_rewards(h, weight, answer_lengths=with_length).double()  # (N, 2, k)
        g = network(h_x).double()  # (N, k)
    n = len(s)
    subsets = list(subsets) if subsets is not None else [DEFAULT_SUBSET] * n
    ids = list(ids) if ids is not None else features.get("index", torch.arange(n)).tolist()
    if len(subsets) != n or len(ids) != n:
        raise ValueError(f"`subsets` and `ids` must have one entry per feature row ({n}).")
    scored = [
        ScoredRow(
            id=ids[i],
            subset=subsets[i],
            chosen_scores=[float(s[i, 0])],
            rejected_scores=[float(s[i, 1])],
            chosen_rewards=r[i, :1].numpy(),
            rejected_rewards=r[i, 1:].numpy(),
            gating=(g[i] / g[i].sum()).numpy(),
            chosen_lengths=None if lengths is None else [int(lengths[i, 0])],
            rejected_lengths=None if lengths is None else [int(lengths[i, 1])],
        )
        for i in range(n)
    ]
    return summarize(scored, objectives)


# ----------------------------------------------------------------------------------------------------------------
# The stage


def _headline(results: dict) -> dict:
    headline = {"accuracy": results["overall"]["accuracy"], "rows": results["counts"]["rows"]}
    headline["skipped"] = results["counts"]["skipped"]
    for key in ("rewardbench", "rewardbench2"):
        if key in results:
            headline[key] = {name: value for name, value in results[key].items() if name != "missing"}
    return headline


def main(config: EvaluateConfig | None = None, /, **kwargs) -> dict:
    """Load the checkpoint and the data, score every row and write the results file `config.out` (also the stage's
    report); returns the results. Pass an `EvaluateConfig`, or its fields as keywords."""
    config = config or EvaluateConfig(**kwargs)
    rank, world_size, created_group, device = init_distributed(config.device)
    try:
        inputs = {"model": model_fingerprint(config.model), "data": data_fingerprint(config.data)}
        data = load_eval_data(config.data, config.split, config.name, config.subsets, sha256=inputs["data"].sha256)
        model = load_model(config.model, config.dtype, device)
        tokenizer = load_tokenizer(config.model)
        results = evaluate(
            model,
            tokenizer,
            data,
            batch_size=config.batch_size,
            max_length=config.max_length,
            truncate_prompt=config.truncate_prompt,
            max_batch_tokens=config.max_batch_tokens,
        )
        if rank == 0:
            out = Path(config.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            # The results file is the report: made first, it is named relative to its folder as every output is.
            out.touch()
            write_report(out, "evaluate", config, inputs, outputs={}, metrics=_headline(results), extra=results)
            _log(results, config.out)
        if world_size > 1:
            dist.barrier()
        return results
    finally:
        if created_group:
            dist.destroy_process_group()


def _log(results: dict, out: str) -> None:
    counts, overall = results["counts"], results["overall"]
    accuracy = "n/a" if overall["accuracy"] is None else f"{overall['accuracy']:.4f}"
    line = f"armorm evaluate: {counts['rows']} rows ({counts['skipped']} skipped), accuracy {accuracy}"
    for key, label in (("rewardbench", "RewardBench"), ("rewardbench2", "RewardBench 2")):
        if "Score" in results.get(key, {}):
            line += f", {label} score {results[key]['Score']:.2f}"
    logger.info("%s -> %s", line, out)
    if counts["skipped"]:
        first = results["skipped"][0]
        logger.warning(
            "%d rows were not scored (listed under `skipped`), e.g. %s: %s",
            counts["skipped"],
            _row_name(first),
            first["reason"],
        )
