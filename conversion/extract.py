"""Extract backbone features for both stages: one forward per response, shards written as they fill (SPEC §3).

    armorm extract --backbone HuggingFaceTB/SmolLM2-135M-Instruct --data ratings.jsonl --kind ratings --out feats/
    torchrun --nproc_per_node 8 -m conversion.cli extract --backbone ... --kind pairs --out pair_feats/

A feature is the backbone's final hidden state (after the final norm, `AutoModel`'s `last_hidden_state`) of the
chat-templated conversation:

    h   = f(x ⊕ y)[last real token]         response feature, every row
    h_x = f(x ⊕ y)[gating position]         prompt feature, pairs only: read from the chosen side's pass

The rows are cut into chunks of `shard_rows` rows in data order; chunk c is shard `shard-{rank}-{c}` and belongs to
rank c % world_size, so the shard boundaries never depend on the number of ranks or on where a run stopped. Inside a
chunk the responses are sorted by length (little padding) and written back in data order. A rerun in the same
folder skips every chunk whose shard and progress record exist, so an interrupted run resumes and ends with the same
files. Under `torchrun` / `accelerate launch` each rank writes its own shards; rank 0 writes `meta.json` last.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from modeling_armorm import gating_pattern_from_tokenizer
from modeling_armorm.modeling_armorm import last_pattern_positions, right_pad

from .backbone import DTYPES, load_backbone, load_tokenizer
from .data import PairRows, RatingRows, load_pairs, load_ratings
from .features import META_NAME, SHARD_NAME, read_meta, save_meta, save_shard


KINDS = ("ratings", "pairs")
PROGRESS_NAME = "progress-{rank:03d}.json"
# The settings that decide the files' contents: a resumed run must use the same ones (batch size and device only
# change the speed, so a run may resume with other values).
RESUME_KEYS = (
    "kind",
    "backbone",
    "data",
    "split",
    "objectives",
    "max_length",
    "truncate_prompt",
    "shard_rows",
    "dtype",
)

__all__ = [
    "ConversationEncoder",
    "EncodedRow",
    "add_arguments",
    "extract",
    "forward_features",
    "length_sorted_batches",
    "main",
    "pad_batch",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="Hub id, local model folder, or a .gguf file.")
    parser.add_argument("--data", required=True, help="Hub dataset id or local json/jsonl/parquet/csv file.")
    parser.add_argument("--split", help="Dataset split; slices such as `train[:1000]` work (default: train).")
    parser.add_argument("--kind", required=True, choices=KINDS, help="`ratings` (stage 1) or `pairs` (stage 2).")
    parser.add_argument("--out", required=True, help="Features folder to write (or to resume).")
    parser.add_argument(
        "--objectives", type=lambda text: text.split(","), help="Ratings: comma-separated label columns, in order."
    )
    parser.add_argument("--max-length", type=int, help="Longest conversation in tokens; longer ones are skipped.")
    parser.add_argument("--batch-size", type=int, help="Responses per forward pass.")
    parser.add_argument("--dtype", choices=list(DTYPES), help="Backbone dtype; features are stored as float32.")
    parser.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="Drop earlier prompt turns (never the system turn, the last user turn or the response) to fit.",
    )
    parser.add_argument("--shard-rows", type=int, help="Rows per shard (memory and resume granularity).")
    parser.add_argument("--device", help="`cpu`, `cuda`, `cuda:1`, ... (default: the rank's GPU, else CPU).")


def main(
    backbone: str,
    data: str,
    out: str,
    kind: str,
    split: str = "train",
    objectives: list[str] | None = None,
    max_length: int = 4096,
    batch_size: int = 8,
    dtype: str = "auto",
    truncate_prompt: bool = False,
    shard_rows: int = 4096,
    device: str | None = None,
) -> dict:
    """Load the backbone and the data, extract every row's features into `out`; returns the folder's meta.

    Args:
        backbone: an `AutoModel` + `AutoTokenizer` Hub id or local folder, or a `.gguf` file.
        data: ratings or pairs data (see `conversion.data`).
        out: the features folder; an interrupted extraction in it is resumed.
        kind: `ratings` (labels, response features) or `pairs` (chosen/rejected and prompt features).
        split: the dataset split (slices such as `train[:1000]` work).
        objectives: ratings only, the label columns in order (default: every numeric column).
        max_length: a conversation over this many tokens is skipped (see `truncate_prompt`) and recorded.
        batch_size: responses per forward pass (4096-token Llama-3-8B rows in bf16: about 8 per 80 GB).
        dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
        truncate_prompt: fit a too long conversation by dropping earlier prompt turns, keeping the system turn, the
            last user turn and the response; if that still does not fit, the row is skipped.
        shard_rows: rows per shard: bounds the memory and the work lost to an interruption.
        device: where the backbone runs; default `cuda:{LOCAL_RANK}` when a GPU is present, else `cpu`.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
    if kind == "pairs" and objectives:
        raise ValueError("`objectives` only applies to `--kind ratings`; pairs have no label columns.")
    rank, world_size, created_group, device = _init_distributed(device)
    try:
        rows = load_ratings(data, split, objectives) if kind == "ratings" else load_pairs(data, split)
        model, tokenizer = load_backbone(backbone, dtype).to(device), load_tokenizer(backbone)
        settings = {
            "kind": kind,
            "backbone": backbone,
            "data": data,
            "split": split,
            "objectives": objectives,
            "max_length": max_length,
            "truncate_prompt": truncate_prompt,
            "shard_rows": shard_rows,
            "dtype": dtype,
        }
        return extract(
            model,
            tokenizer,
            rows,
            out,
            max_length=max_length,
            truncate_prompt=truncate_prompt,
            batch_size=batch_size,
            shard_rows=shard_rows,
            settings=settings,
        )
    finally:
        if created_group:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _init_distributed(device: str | None) -> tuple[int, int, bool, torch.device]:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    device = torch.device(device)
    created = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world_size, created, device


# ----------------------------------------------------------------------------------------------------------------
# Tokenization and the length policy


@dataclass
class EncodedRow:
    """One data row as token ids: one sequence per side (ratings: 1, pairs: chosen then rejected)."""

    input_ids: list[list[int]]
    gating_positions: list[int]  # per side; -1 where no prompt feature is needed
    dropped_turns: int = 0  # prompt messages dropped by `truncate_prompt`


def _truncation_starts(messages: list[dict]) -> list[int]:
    """Where the kept prompt may start (after the leading system turns), from the fewest turns dropped to the most.

    The last prompt message (the last user turn) is always kept, and a kept prompt starts with a user turn so that
    templates which require alternating roles still render it.
    """
    prompt = messages[:-1]
    n_system = next((i for i, message in enumerate(prompt) if message["role"] != "system"), len(prompt))
    last = len(prompt) - 1
    return [i for i in range(n_system + 1, last + 1) if prompt[i]["role"] == "user" or i == last]


def _drop_turns(messages: list[dict], start: int) -> list[dict]:
    n_system = next((i for i, message in enumerate(messages) if message["role"] != "system"), len(messages))
    return messages[:n_system] + messages[start:]


class ConversationEncoder:
    """Render conversations with the tokenizer's chat template, apply the length policy, find the gating position.

    `encode(rows)` takes rows as lists of sides (each side a full conversation ending with the answer) and returns,
    per row, an `EncodedRow` or the reason it is skipped (a string).
    """

    def __init__(self, tokenizer, max_length: int, truncate_prompt: bool, need_gating: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate_prompt = truncate_prompt
        self.need_gating = need_gating
        self.pattern = gating_pattern_from_tokenizer(tokenizer)

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # The rendered template already holds its special tokens (BOS included), as in `gating_pattern_from_tokenizer`.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(self, rows: list[list[list[dict]]]) -> list["EncodedRow | str"]:
        texts, failures = [], {}
        for i, sides in enumerate(rows):
            try:
                rendered = [self._render(side) for side in sides]
            except (jinja2.TemplateError, ValueError, TypeError) as error:
                failures[i] = f"the chat template cannot render this conversation: {error}"
                rendered = [""] * len(sides)  # keeps one text per side, so the ids below stay aligned
            texts.extend(rendered)
        all_ids = iter(self._tokenize(texts))
        results = []
        for i, sides in enumerate(rows):
            ids = [next(all_ids) for _ in sides]
            results.append(failures[i] if i in failures else self._fit(sides, ids))
        return results

    def _fit(self, sides: list[list[dict]], ids: list[list[int]]) -> "EncodedRow | str":
        longest, dropped = max(map(len, ids)), 0
        if longest > self.max_length:
            if not self.truncate_prompt:
                return (
                    f"too long: {longest} tokens > max_length {self.max_length} (raise `--max-length` or pass "
                    "`--truncate-prompt` to drop earlier prompt turns)"
                )
            # Both sides share the prompt, so both drop the same turns: the prompt feature stays one feature.
            for start in _truncation_starts(sides[0]):
                shorter = [_drop_turns(side, start) for side in sides]
                ids = self._tokenize([self._render(side) for side in shorter])
                longest = max(map(len, ids))
                if longest <= self.max_length:
                    dropped = len(sides[0]) - len(shorter[0])
                    break
            else:
                return (
                    f"too long: {longest} tokens > max_length {self.max_length} even with only the system turn, the "
                    "last user turn and the response kept (responses are never cut; raise `--max-length`)"
                )
        positions = [-1] * len(sides)
        if self.need_gating:
            positions = [
                int(last_pattern_positions(torch.tensor([row]), torch.ones(1, len(row)), self.pattern.token_ids)[0])
                for row in ids
            ]
            if min(positions) < 0:
                return (
                    f"no gating pattern {self.pattern.text!r} in the rendered conversation, so its prompt feature "
                    "cannot be located (does the conversation end with the assistant's answer?)"
                )
            positions = [position + self.pattern.offset for position in positions]
        return EncodedRow(ids, positions, dropped)


# ----------------------------------------------------------------------------------------------------------------
# The forward pass


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of sequence indices sorted by length, longest first (little padding; an OOM shows at once)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_batch(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and `position_ids` counted over the real tokens."""
    input_ids, attention_mask = right_pad(sequences, pad_token_id)
    # Positions from the mask, as ArmoRMForRewardModeling.forward does, so any padding sees the unpadded positions.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class Progress:
    """A tqdm bar over responses that also shows the real (unpadded) tokens per second."""

    def __init__(self, total: int, desc: str, disable: bool):
        self.bar = tqdm(total=total, unit=" responses", desc=desc, disable=disable)
        self.tokens, self.start = 0, time.perf_counter()

    def update(self, responses: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(responses)
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tok/s", False)

    def close(self) -> None:
        self.bar.close()


@torch.inference_mode()
def forward_features(
    model: torch.nn.Module,
    sequences: list[list[int]],
    gating_positions: list[int] | None,
    batch_size: int,
    pad_token_id: int,
    progress: "Progress | None" = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (last real token) and, with `gating_positions`, h_x of every sequence, float32 on CPU, in input order."""
    device = next(model.parameters()).device
    n, d = len(sequences), model.config.hidden_size
    last = torch.empty(n, d, dtype=torch.float32)
    prompt = torch.empty(n, d, dtype=torch.float32) if gating_positions is not None else None
    for batch in length_sorted_batches([len(ids) for ids in sequences], batch_size):
        inputs = {
            key: value.to(device) for key, value in pad_batch([sequences[i] for i in batch], pad_token_id).items()
        }
        hidden = model(**inputs, use_cache=False).last_hidden_state  # (batch, seq, d)
        rows = torch.arange(len(batch), device=device)
        lengths = inputs["attention_mask"].sum(-1)  # (batch,) real tokens; right padding: the last is at length - 1
        last[batch] = hidden[rows, lengths - 1].float().cpu()
        if prompt is not None:
            positions = torch.tensor([gating_positions[i] for i in batch], device=device)
            prompt[batch] = hidden[rows, positions].float().cpu()
        if progress is not None:
            progress.update(len(batch), int(lengths.sum()))
    return last, prompt


# ----------------------------------------------------------------------------------------------------------------
# Chunks, shards, resume


def _sides(rows: RatingRows | PairRows, i: int) -> list[list[dict]]:
    return [rows.messages[i]] if isinstance(rows, RatingRows) else [rows.chosen[i], rows.rejected[i]]


def _extract_chunk(model, encoder: ConversationEncoder, rows, start: int, stop: int, batch_size: int, pad_id, bar):
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
    sequences = [ids for _, row in kept for ids in row.input_ids]  # row-major: row j side s at j * n_sides + s
    gating = [position for _, row in kept for position in row.gating_positions] if pairs else None
    last, prompt = forward_features(model, sequences, gating, batch_size, pad_id, bar)
    if bar is not None:
        bar.update(len(skipped) * n_sides, 0)  # skipped responses are done too, so the bar reaches its total

    d = model.config.hidden_size
    tensors = {"index": torch.tensor([rows.index[i] for i, _ in kept], dtype=torch.int64)}
    if pairs:
        tensors["embeddings"] = last.view(len(kept), n_sides, d)  # (rows, 2, d): 0 chosen, 1 rejected
        tensors["prompt_embeddings"] = prompt.view(len(kept), n_sides, d)[:, 0].contiguous()  # the chosen side's pass
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


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_progress(out: Path, settings: dict) -> dict[int, dict]:
    """Every finished chunk recorded in `out` (by any rank of any earlier run), after checking the settings match."""
    records: dict[int, dict] = {}
    for path in sorted(out.glob(PROGRESS_NAME.replace("{rank:03d}", "*"))):
        progress = json.loads(path.read_text(encoding="utf-8"))
        _check_settings(out, progress.get("settings", {}), settings)
        for chunk, record in progress.get("chunks", {}).items():
            if (out / record["shard"]).is_file():
                records[int(chunk)] = record
    if not records and (out / META_NAME).is_file():
        _check_settings(out, read_meta(out).get("settings", {}), settings)
    if not records and any(out.glob("*.safetensors")) and not (out / META_NAME).is_file():
        raise FileExistsError(
            f"`{out}` holds shards but no progress record of `armorm extract`, so it cannot be resumed safely. "
            "Give an empty or new `--out` folder."
        )
    return records


def _check_settings(out: Path, found: dict, settings: dict) -> None:
    differ = {key: (found.get(key), settings[key]) for key in RESUME_KEYS if found.get(key) != settings[key]}
    if found and differ:
        details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differ.items())
        raise ValueError(
            f"`{out}` holds an extraction with other settings ({details}), so it cannot be resumed. Rerun with the "
            "same settings, or give a new `--out` folder."
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
    encoder = ConversationEncoder(tokenizer, max_length, truncate_prompt, need_gating=pairs)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    n_rows = len(rows.index)
    n_chunks = max(1, math.ceil(n_rows / shard_rows))  # one (maybe empty) shard even for empty data
    done = _read_progress(out, settings)
    progress_path = out / PROGRESS_NAME.format(rank=rank)
    own = json.loads(progress_path.read_text(encoding="utf-8"))["chunks"] if progress_path.is_file() else {}
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
        tensors, record = _extract_chunk(model, encoder, rows, start, stop, batch_size, pad_id, bar)
        record = {"shard": name, "sha256": save_shard(out, name, tensors), **record}
        own[str(chunk)] = record
        _write_json(
            progress_path, {"settings": settings, "chunks": dict(sorted(own.items(), key=lambda kv: int(kv[0])))}
        )
    bar.close()

    if distributed:
        dist.barrier()
    if rank == 0:
        meta = _build_meta(out, model, encoder, rows, settings, n_chunks)
        save_meta(out, meta)
        print(
            f"armorm extract: {meta['counts']['rows']} rows, {meta['counts']['skipped']} skipped, "
            f"{meta['counts']['tokens']:,} tokens -> {out}"
        )
    if distributed:
        dist.barrier()
    return read_meta(out)


def _build_meta(out: Path, model, encoder: ConversationEncoder, rows, settings: dict, n_chunks: int) -> dict:
    records = _read_progress(out, settings)
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
        "backbone": settings["backbone"],
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
        **{key: settings[key] for key in ("data", "split", "dtype", "max_length", "truncate_prompt", "shard_rows")},
    }
