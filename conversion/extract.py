"""Extract backbone features for both stages: one forward per response, shards written as they fill.

    armorm extract --backbone HuggingFaceTB/SmolLM2-135M-Instruct --data ratings.jsonl --kind ratings --out feats/
    torchrun --nproc_per_node 8 -m armorm_cli extract --backbone ... --kind pairs --out pair_feats/

A feature is the backbone's final hidden state (after the final norm, `AutoModel`'s `last_hidden_state`) of the
chat-templated conversation (arXiv 2406.12845 §3.1: the last token's hidden state of x ⊕ y):

    h   = f(x ⊕ y)[last real token]         response feature, every row
    h_x = f(x ⊕ y)[gating position]         prompt feature, pairs only: read from the chosen side's pass
    n   = last position − gating position  the answer's length in tokens (`answer_lengths`), every response

Conversations are encoded by `modeling_armorm.scoring.ChatEncoder`, the path every scorer shares: the gating
position comes from the rendering, and markup in an answer is never read as the template's special tokens.

The rows are cut into chunks of `shard_rows` rows in data order; chunk c is shard `shard-{rank}-{c}` and belongs to
rank c % world_size, so the shard boundaries never depend on the number of ranks or on where a run stopped. Inside a
chunk the responses are sorted by length (little padding) and written back in data order. A rerun in the same
folder skips every chunk whose shard and progress record exist, so an interrupted run resumes and ends with the same
files; a folder written from other data, another backbone or other settings is refused (`--overwrite` starts it
again). Under `torchrun` / `accelerate launch` each rank writes its own shards; rank 0 writes `meta.json` last.
"""

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from armorm_io.backbone import backbone_fingerprint, load_backbone, load_tokenizer
from armorm_io.data import PairRows, RatingRows, data_fingerprint, load_pairs, load_ratings
from armorm_io.distributed import init_distributed
from armorm_io.features import KINDS, META_NAME, SHARD_NAME, folder_fingerprint, read_meta, save_meta, save_shard
from armorm_io.files import Fingerprint, atomic_write_json, file_sha256
from armorm_io.pair_keys import pair_key, prompt_key
from armorm_io.reports import write_report
from modeling_armorm.length_policy import ConversationEncoder, EncodedRow
from modeling_armorm.scoring import EncodedConversation, Progress, conversation_features, pad_token_id
from modeling_armorm.settings import (
    BatchSettings,
    DeviceSettings,
    DtypeSettings,
    LengthSettings,
    Location,
    fit_dtype,
    normalize_locations,
)


logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress-{rank:03d}.json"
# The settings that decide the files' contents, with the content hashes of the data and the backbone (not their
# paths: a moved file is the same data, an edited one is not): a resumed run must match them all. Batch size and
# device only change the speed, so a run may resume with other values.
RESUME_KEYS = (
    "kind",
    "backbone_sha256",
    "data_sha256",
    "split",
    "name",
    "objectives",
    "max_length",
    "truncate_prompt",
    "shard_rows",
    "dtype",
)

__all__ = [
    "ARGUMENTS",
    "ExtractConfig",
    "ExtractSettings",
    "can_resume",
    "clear",
    "extract",
    "forward_features",
    "main",
]


@dataclass(kw_only=True)
class ExtractSettings(LengthSettings, BatchSettings, DeviceSettings, DtypeSettings):
    """The knobs of `armorm extract` (the ones `armorm build` passes on as `--extract-<name>`), with the shared
    length policy, batch size, device and dtype."""

    split: str = field(default="train", metadata={"help": "Dataset split; slices such as `train[:1000]` work."})
    name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    objectives: list[str] | None = field(
        default=None,
        metadata={"help": "Ratings: the label columns, in order (space- or comma-separated; default: every numeric)."},
    )
    shard_rows: int = field(default=4096, metadata={"help": "Rows per shard (memory and resume granularity)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Start again in an `--out` folder that holds another extraction."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.objectives is not None:
            self.objectives = [name for item in self.objectives for name in item.split(",") if name]


@dataclass(kw_only=True)
class ExtractConfig(ExtractSettings):
    """`armorm extract`: what it reads and writes, and its settings."""

    backbone: Location = field(metadata={"help": "Hub id, local model folder, or a `.gguf` file."})
    data: Location = field(metadata={"help": "Hub dataset id or a local json/jsonl/parquet/csv file."})
    kind: Literal["ratings", "pairs"] = field(metadata={"help": "`ratings` (stage 1) or `pairs` (stage 2)."})
    out: Location = field(metadata={"help": "The features folder to write (or to resume)."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "pairs" and self.objectives:
            raise ValueError("`objectives` only applies to `--kind ratings`; pairs have no label columns.")


ARGUMENTS = (ExtractConfig,)


def main(config: ExtractConfig | None = None, /, **kwargs) -> dict:
    """Load the backbone and the data, extract every row's features into `config.out`; returns the folder's meta
    (and writes the stage report `extract.json` beside it). Pass an `ExtractConfig`, or its fields as keywords."""
    config = config or ExtractConfig(**kwargs)
    rank, world_size, created_group, device = init_distributed(config.device)
    try:
        data, backbone = data_fingerprint(config.data), backbone_fingerprint(config.backbone)
        settings = _resume_settings(config, data, backbone)
        out = Path(config.out)
        if config.overwrite and rank == 0:
            clear(out)
        if world_size > 1:
            dist.barrier()
        _check_resumable(out, settings)  # before the slow loads: a stale folder fails at once
        if world_size > 1:
            # Every rank has read the folder before any writes to it: a rank that checked late saw another's first
            # shard before its progress record, and refused the folder as a stale one.
            dist.barrier()
        if config.kind == "ratings":
            # Read only if the data still has the content hashed above: the report's hash is the rows' own.
            rows = load_ratings(config.data, config.split, config.objectives, name=config.name, sha256=data.sha256)
        else:
            rows = load_pairs(config.data, config.split, name=config.name, sha256=data.sha256)
        model = fit_dtype(load_backbone(config.backbone, config.dtype), config.dtype, device).to(device)
        tokenizer = load_tokenizer(config.backbone)
        meta = extract(
            model,
            tokenizer,
            rows,
            out,
            max_length=config.max_length,
            truncate_prompt=config.truncate_prompt,
            batch_size=config.batch_size,
            max_batch_tokens=config.max_batch_tokens,
            shard_rows=config.shard_rows,
            settings=settings,
        )
        if rank == 0:
            write_report(
                out / "extract.json",
                "extract",
                config,
                inputs={"backbone": backbone, "data": data},
                outputs={"features": folder_fingerprint(out)},
                metrics={"counts": meta["counts"]},
            )
        return meta
    finally:
        if created_group:
            dist.destroy_process_group()


def _resume_settings(config: ExtractConfig, data: Fingerprint, backbone: Fingerprint) -> dict:
    """What identifies an extraction's files: the content hashes of the data and the backbone (a Hub id by its name
    when it cannot be hashed here) and every setting that changes the features."""
    settings = {key: getattr(config, key) for key in RESUME_KEYS if hasattr(config, key)}
    settings.update(
        backbone=config.backbone,
        data=config.data,
        backbone_sha256=backbone.sha256 or f"hub id {config.backbone}",
        data_sha256=data.sha256 or f"hub id {config.data}",
        shard_tensors=2,  # 2: pairs shards hold `prompt_keys` and `pair_keys`; an older folder is not resumed
    )
    return settings


def clear(out: Path) -> None:
    """Remove what an earlier extraction left in `out` (its shards, progress records, meta and report): `--overwrite`."""
    if not out.is_dir():
        return
    for path in [
        *out.glob("shard-*.safetensors"),
        *out.glob("progress-*.json"),
        out / META_NAME,
        out / "extract.json",
    ]:
        if path.is_file():
            path.unlink()
    for stale in out.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()


# ----------------------------------------------------------------------------------------------------------------
# Tokenization and the length policy


# ----------------------------------------------------------------------------------------------------------------
# The forward pass


def forward_features(
    model: torch.nn.Module,
    sequences: list[EncodedConversation],
    with_prompt: bool,
    batch_size: int,
    pad_id: int,
    progress: Progress | None = None,
    max_batch_tokens: int | None = None,
    pack: bool | None = None,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (last real token) and, with `with_prompt`, h_x (gating position) of every sequence, float32 on the CPU, in
    input order: `scoring.conversation_features`, batches of at most `batch_size` rows and `max_batch_tokens` tokens,
    a prompt shared by several responses run once (`share_prefix`), packed on a CPU where the backbone allows it
    (`pack`), else right-padded."""
    h, h_x = conversation_features(
        model, sequences, batch_size, pad_id, progress, max_batch_tokens, pack, share_prefix
    )
    return h, h_x if with_prompt else None


# ----------------------------------------------------------------------------------------------------------------
# Chunks, shards, resume


def _sides(rows: RatingRows | PairRows, i: int) -> list[list[dict]]:
    return [rows.messages[i]] if isinstance(rows, RatingRows) else [rows.chosen[i], rows.rejected[i]]


def _extract_chunk(
    model,
    encoder: ConversationEncoder,
    rows,
    start: int,
    stop: int,
    batch_size: int,
    pad_id,
    bar,
    max_batch_tokens: int | None = None,
):
    """Features of rows[start:stop] as shard tensors, plus the chunk's record (skipped and truncated rows)."""
    pairs = isinstance(rows, PairRows)
    encoded = encoder.encode([_sides(rows, i) for i in range(start, stop)])
    kept = [(i, row) for i, row in zip(range(start, stop), encoded) if isinstance(row, EncodedRow)]
    skipped = [
        {"index": int(rows.index[i]), "reason": row}
        for i, row in zip(range(start, stop), encoded)
        if isinstance(row, str)
    ]
    n_sides = 2 if pairs else 1
    sequences = [side for _, row in kept for side in row.sides]  # row-major: row j side s at j * n_sides + s
    last, prompt = forward_features(model, sequences, pairs, batch_size, pad_id, bar, max_batch_tokens)
    if bar is not None:
        bar.update(len(skipped) * n_sides, 0)  # skipped responses are done too, so the bar reaches its total

    d = model.config.hidden_size
    tensors = {"index": torch.tensor([rows.index[i] for i, _ in kept], dtype=torch.int64)}
    # n = tokens after the gating position up to the last one: the answer's length, as the model's forward counts it.
    lengths = torch.tensor([side.answer_length for side in sequences], dtype=torch.int64)
    tensors["answer_lengths"] = lengths.view(len(kept), n_sides) if pairs else lengths  # (rows, 2) or (rows,)
    if pairs:
        tensors["embeddings"] = last.view(len(kept), n_sides, d)  # (rows, 2, d): 0 chosen, 1 rejected
        tensors["prompt_embeddings"] = prompt.view(len(kept), n_sides, d)[:, 0].contiguous()  # the chosen side's pass
        # Content keys (armorm_io.pair_keys): which prompt and which pair each row is, whatever file it came from.
        tensors["prompt_keys"] = torch.tensor([prompt_key(rows.chosen[i]) for i, _ in kept], dtype=torch.int64)
        tensors["pair_keys"] = torch.tensor(
            [pair_key(rows.chosen[i], rows.rejected[i]) for i, _ in kept], dtype=torch.int64
        )
    else:
        tensors["embeddings"] = last  # (rows, d)
        labels = rows.labels[[i for i, _ in kept]] if kept else np.zeros((0, rows.labels.shape[1]), np.float32)
        tensors["labels"] = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))  # (rows, k), NaN kept
    record = {
        "rows": len(kept),
        "tokens": sum(map(len, sequences)),
        "skipped": skipped,
        "truncated": [
            {"index": int(rows.index[i]), "dropped_turns": row.dropped_turns} for i, row in kept if row.dropped_turns
        ],
    }
    return tensors, record


def _read_progress(out: Path, settings: dict, verify: bool = True) -> dict[int, dict]:
    """Every finished chunk recorded in `out` (by any rank of any earlier run), after checking the settings match.

    With `verify`, a shard whose file no longer has the sha256 its record holds (flipped bytes, a truncated copy) is
    left out, so that its chunk is extracted again rather than read back corrupt."""
    _check_resumable(out, settings)
    records: dict[int, dict] = {}
    for path in sorted(out.glob(PROGRESS_NAME.replace("{rank:03d}", "*"))):
        for chunk, record in _read_json(path).get("chunks", {}).items():
            shard = out / record["shard"]
            if not shard.is_file():
                continue
            if verify and file_sha256(shard) != record["sha256"]:
                logger.warning("Shard %s is corrupt (its sha256 is not the one recorded): extracting it again.", shard)
                continue
            records[int(chunk)] = record
    return records


def can_resume(config: ExtractConfig) -> bool:
    """Whether `config.out` is empty or holds an extraction of this very data, backbone and settings (else
    `--overwrite` is needed to extract there)."""
    settings = _resume_settings(config, data_fingerprint(config.data), backbone_fingerprint(config.backbone))
    try:
        _check_resumable(Path(config.out), settings)
    except (ValueError, FileExistsError):
        return False
    return True


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_resumable(out: Path, settings: dict) -> None:
    """Refuse a folder that holds another extraction: other data (by content), backbone or settings."""
    found = [_read_json(path).get("settings", {}) for path in sorted(out.glob("progress-*.json"))]
    if not found and (out / META_NAME).is_file():
        found = [read_meta(out).get("settings", {})]
    if not found and any(out.glob("*.safetensors")):
        raise FileExistsError(
            f"`{out}` holds shards but no progress record of `armorm extract`, so it cannot be resumed safely. "
            "Give an empty or new `--out` folder, or pass `--overwrite`."
        )
    for previous in found:
        differ = {key: (previous.get(key), settings[key]) for key in RESUME_KEYS if previous.get(key) != settings[key]}
        if differ:
            details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differ.items())
            raise ValueError(
                f"`{out}` holds an extraction made from other data, another backbone or other settings ({details}), "
                "so it cannot be resumed or reused. Pass `--overwrite` to extract again there, or give a new `--out`."
            )


def extract(
    model: torch.nn.Module,
    tokenizer,
    rows: RatingRows | PairRows,
    out: str | os.PathLike,
    *,
    max_length: int,
    truncate_prompt: bool,
    batch_size: int,
    shard_rows: int,
    settings: dict,
    max_batch_tokens: int | None = None,
) -> dict:
    """Extract the features of `rows` with a loaded backbone into `out` (this rank's chunks), resuming; returns meta.

    `settings` (see `RESUME_KEYS`) identify the run: a folder written with other settings is never resumed.
    Every rank of a process group calls it; rank 0 writes `meta.json` once all the ranks are done.
    """
    if shard_rows < 1:
        raise ValueError(f"`shard_rows` must be >= 1, got {shard_rows}.")
    pairs = isinstance(rows, PairRows)
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    position_limit = getattr(model.config, "max_position_embeddings", None)
    encoder = ConversationEncoder(tokenizer, max_length, truncate_prompt, position_limit)
    pad_id = pad_token_id(tokenizer)

    n_rows = len(rows.index)
    n_chunks = max(1, math.ceil(n_rows / shard_rows))  # one (maybe empty) shard even for empty data
    done = _read_progress(out, settings)
    progress_path = out / PROGRESS_NAME.format(rank=rank)
    own = _read_json(progress_path)["chunks"] if progress_path.is_file() else {}
    todo = [c for c in range(rank, n_chunks, world_size) if c not in done]
    n_sides = 2 if pairs else 1
    total = sum(min(shard_rows, n_rows - c * shard_rows) for c in todo) * n_sides
    bar = Progress(total, f"Extracting {'pairs' if pairs else 'ratings'}", disable=rank != 0)
    for chunk in todo:
        start, stop = chunk * shard_rows, min((chunk + 1) * shard_rows, n_rows)
        name = SHARD_NAME.format(rank=rank, index=chunk)
        # A chunk written under another rank by an earlier run of another world size: keep one copy only.
        for stale in out.glob(SHARD_NAME.replace("{rank:03d}", "*").format(index=chunk)):
            if stale.name != name:
                stale.unlink()
        tensors, record = _extract_chunk(model, encoder, rows, start, stop, batch_size, pad_id, bar, max_batch_tokens)
        record = {"shard": name, "sha256": save_shard(out, name, tensors), **record}
        own[str(chunk)] = record
        atomic_write_json(
            progress_path, {"settings": settings, "chunks": dict(sorted(own.items(), key=lambda kv: int(kv[0])))}
        )
    bar.close()

    if distributed:
        dist.barrier()
    if rank == 0:
        meta = _build_meta(out, model, encoder, rows, settings, n_chunks)
        save_meta(out, meta)
        counts = meta["counts"]
        logger.info(
            "armorm extract: %d rows, %d skipped, %s tokens -> %s",
            counts["rows"],
            counts["skipped"],
            f"{counts['tokens']:,}",
            out,
        )
    if distributed:
        dist.barrier()
    return read_meta(out)


def _build_meta(out: Path, model, encoder: ConversationEncoder, rows, settings: dict, n_chunks: int) -> dict:
    records = _read_progress(out, settings, verify=False)  # verified when this run started, then written by it
    missing = [chunk for chunk in range(n_chunks) if chunk not in records]
    if missing:
        raise RuntimeError(
            f"Chunks {missing} of `{out}` have no shard: a rank stopped early. Rerun the same command to finish them."
        )
    chunks = [records[chunk] for chunk in range(n_chunks)]
    skipped = sorted(
        list(rows.skipped) + [s for record in chunks for s in record["skipped"]], key=lambda s: s["index"]
    )
    pattern = encoder.pattern
    return {
        "kind": settings["kind"],
        "hidden_size": model.config.hidden_size,
        "objectives": list(rows.objectives) if isinstance(rows, RatingRows) else [],
        "shards": [record["shard"] for record in chunks],
        "checksums": {record["shard"]: record["sha256"] for record in chunks},
        "backbone": settings.get("backbone"),
        "backbone_dtype": str(model.dtype).removeprefix("torch."),
        "pattern": {"token_ids": list(pattern.token_ids), "offset": pattern.offset, "text": pattern.text},
        "counts": {
            "rows": sum(record["rows"] for record in chunks),
            "skipped": len(skipped),
            "source_rows": len(rows.index) + len(rows.skipped),
            "tokens": sum(record["tokens"] for record in chunks),
            "truncated": sum(len(record["truncated"]) for record in chunks),
        },
        "skipped": skipped,
        "truncated": sorted((t for record in chunks for t in record["truncated"]), key=lambda t: t["index"]),
        "settings": settings,
        **{
            key: settings.get(key) for key in ("data", "split", "dtype", "max_length", "truncate_prompt", "shard_rows")
        },
    }
