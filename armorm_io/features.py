"""Features folders: safetensors shards plus one `meta.json`, written by `extract`, read by every later stage.

A folder holds `*.safetensors` shards and a `meta.json` with at least `kind` ("ratings" | "pairs"), `hidden_size`,
`objectives` and `shards` (the shard names in row order). Optional `checksums` maps a shard name to the sha256 of its
file; readers verify a shard whose checksum is recorded and trust the others (a folder written by another tool).

Ratings shards: `embeddings` (N, d) float32, `labels` (N, k) float32 (NaN = missing), `index` (N,) int64.
Pairs shards: `embeddings` (N, 2, d) (0 chosen, 1 rejected), `prompt_embeddings` (N, d), `index` (N,) int64.
`armorm extract` also writes `answer_lengths`, (N,) or (N, 2) int64: each answer's tokens after the gating position
(the length objective's input), and for pairs `prompt_keys` and `pair_keys`, (N,) int64: the content keys of each
row's prompt and pair (`armorm_io.pair_keys`); folders written by other tools may lack them.
`index` is a row's position in the source data, so rows written by several ranks come back in the source order.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from armorm_io.files import Fingerprint, atomic_write, atomic_write_json, file_sha256


SHARD_NAME = "shard-{rank:03d}-{index:05d}.safetensors"
META_NAME = "meta.json"
KINDS = ("ratings", "pairs")
# Rows per shard for `write_features`: 50k rows of d = 4096 float32 are 800 MB, a size that still loads in one go.
DEFAULT_SHARD_ROWS = 50_000

__all__ = [
    "KINDS",
    "META_NAME",
    "SHARD_NAME",
    "file_sha256",
    "folder_fingerprint",
    "iter_shards",
    "load_features",
    "read_meta",
    "save_meta",
    "save_shard",
    "shard_names",
    "write_features",
]


def save_shard(folder: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Atomically write one shard; returns its sha256 (which `save_meta` would otherwise compute from the file)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return file_sha256(path)


def save_meta(folder: str | os.PathLike, meta: dict) -> None:
    """Atomically write `meta.json`. Every listed shard without a recorded checksum gets one, from its file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)  # never mutate the caller's dict
    if meta.get("shards"):
        checksums = dict(meta.get("checksums") or {})
        for name in meta["shards"]:
            if name not in checksums and (folder / name).exists():
                checksums[name] = file_sha256(folder / name)
        meta["checksums"] = checksums
    atomic_write_json(folder / META_NAME, meta)


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: `{folder}` is not a features folder (run `armorm extract` first)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def folder_fingerprint(folder: str | os.PathLike) -> Fingerprint:
    """A features folder's `Fingerprint`: the sha256 of its shard names and checksums, in row order (the checksums
    recorded in meta.json, computed for the shards that lack one)."""
    folder = Path(folder)
    checksums = (read_meta(folder) if (folder / META_NAME).is_file() else {}).get("checksums") or {}
    listing = [[name, checksums.get(name) or file_sha256(folder / name)] for name in shard_names(folder)]
    return Fingerprint(str(folder), hashlib.sha256(json.dumps(listing).encode()).hexdigest())


def shard_names(folder: str | os.PathLike) -> list[str]:
    """`meta["shards"]` when present (row order), else every `*.safetensors` of the folder in name order."""
    folder = Path(folder)
    meta_path = folder / META_NAME
    meta = read_meta(folder) if meta_path.is_file() else {}
    if meta.get("shards"):
        return list(meta["shards"])
    return sorted(path.name for path in folder.glob("*.safetensors"))


def iter_shards(
    folder: str | os.PathLike, keys: list[str] | None = None, verify: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the shards one at a time (memory of one shard), verifying each recorded checksum first.

    `keys` reads only those of the tensors a shard holds (e.g. the labels, without the embeddings); `verify=False`
    skips the checksums, for a second pass over a folder already verified.
    """
    folder = Path(folder)
    checksums = (read_meta(folder) if (folder / META_NAME).is_file() else {}).get("checksums") or {}
    names = shard_names(folder)
    if not names:
        raise FileNotFoundError(f"`{folder}` holds no `*.safetensors` shard (run `armorm extract` first).")
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"Shard `{name}` listed in {folder / META_NAME} is missing; re-run the extraction."
            )
        expected = checksums.get(name) if verify else None
        if expected is not None and (actual := file_sha256(path)) != expected:
            raise ValueError(
                f"Shard `{path}` is corrupt: sha256 {actual} but meta.json records {expected}. "
                "Re-run the extraction for it (or delete its `checksums` entry to trust the file)."
            )
        if keys is None:
            yield load_file(path)
            continue
        with safe_open(path, framework="pt") as f:
            yield {key: f.get_tensor(key) for key in keys if key in f.keys()}


def load_features(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Every shard concatenated on dim 0, rows in the order of the int64 `index` tensor when present."""
    folder = Path(folder)
    meta = read_meta(folder) if (folder / META_NAME).is_file() else {}
    parts: dict[str, list[torch.Tensor]] = {}
    for position, shard in enumerate(iter_shards(folder)):
        if position and set(shard) != set(parts):
            raise ValueError(
                f"Shard {position} of `{folder}` holds tensors {sorted(shard)} but the first holds {sorted(parts)}; "
                "every shard of a folder must hold the same tensors."
            )
        for key, value in shard.items():
            parts.setdefault(key, []).append(value)
    tensors = {key: torch.cat(values) if len(values) > 1 else values[0] for key, values in parts.items()}
    rows = {key: value.shape[0] for key, value in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"Tensors of `{folder}` disagree on the row count: {rows}.")
    if "index" in tensors:
        index = tensors["index"]
        order = torch.argsort(index, stable=True)
        sorted_index = index[order]
        duplicated = sorted_index[1:][sorted_index[1:] == sorted_index[:-1]]
        if duplicated.numel():
            raise ValueError(
                f"`{folder}`: source row {int(duplicated[0])} appears in more than one shard (a rank ran twice?); "
                "delete the duplicate shard or list only the right ones in meta.json `shards`."
            )
        tensors = {key: value[order] for key, value in tensors.items()}
    return tensors, meta


def load_pair_features(folders: str | os.PathLike | list) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One or several pairs (or ratings) features folders of one kind, concatenated in the order given; the
    stages after `fit` take several datasets this way. Returns the tensors and each folder's meta."""
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    loaded = [load_features(folder) for folder in folders]
    kinds = {meta.get("kind") for _, meta in loaded}
    keys = {tuple(sorted(tensors)) for tensors, _ in loaded}
    if len(kinds) > 1 or len(keys) > 1:
        raise ValueError(
            f"The features folders {folders} mix kinds {sorted(map(str, kinds))} or tensors {sorted(keys)}."
        )
    tensors = {key: torch.cat([t[key] for t, _ in loaded]) for key in loaded[0][0] if key != "index"}
    return tensors, [meta for _, meta in loaded]


def _check_tensors(kind: str, tensors: dict[str, torch.Tensor], objectives: list[str] | None) -> tuple[int, int]:
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    embeddings = tensors.get("embeddings")
    if embeddings is None:
        raise ValueError("`tensors` must hold `embeddings`.")
    n, d = embeddings.shape[0], embeddings.shape[-1]
    if kind == "ratings":
        labels = tensors.get("labels")
        if embeddings.ndim != 2 or labels is None or labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError("ratings need `embeddings` (N, d) and `labels` (N, k) with the same N.")
        if objectives is not None and len(objectives) != labels.shape[1]:
            raise ValueError(f"{len(objectives)} `objectives` for {labels.shape[1]} label columns.")
    else:
        prompt = tensors.get("prompt_embeddings")
        if embeddings.ndim != 3 or embeddings.shape[1] != 2 or prompt is None or prompt.shape != (n, d):
            raise ValueError("pairs need `embeddings` (N, 2, d) and `prompt_embeddings` (N, d).")
    for key, value in tensors.items():
        if value.shape[0] != n:
            raise ValueError(f"`{key}` has {value.shape[0]} rows, `embeddings` has {n}.")
    return n, d


def write_features(
    folder: str | os.PathLike,
    kind: str,
    tensors: dict[str, torch.Tensor],
    objectives: list[str] | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    **meta_fields,
) -> None:
    """Write a whole features folder from in-memory tensors (small jobs, tests, benchmarks) in one call.

    `index` defaults to 0..N-1. `meta_fields` (backbone, pattern, skipped, ...) go into meta.json as they are.
    """
    n, d = _check_tensors(kind, tensors, objectives)
    if shard_rows < 1:
        raise ValueError(f"`shard_rows` must be >= 1, got {shard_rows}.")
    tensors = dict(tensors)
    tensors.setdefault("index", torch.arange(n, dtype=torch.int64))
    shards, checksums = [], {}
    for number, start in enumerate(range(0, max(n, 1), shard_rows)):
        name = SHARD_NAME.format(rank=0, index=number)
        checksums[name] = save_shard(
            folder, name, {key: value[start : start + shard_rows] for key, value in tensors.items()}
        )
        shards.append(name)
    counts = {"rows": n}
    if kind == "ratings":
        names = objectives or [str(i) for i in range(tensors["labels"].shape[1])]
        counts["labels"] = dict(zip(names, (~tensors["labels"].isnan()).sum(0).tolist()))
    meta = {
        "kind": kind,
        "hidden_size": d,
        "objectives": list(objectives) if objectives is not None else None,
        "counts": counts,
        "skipped": [],
        **meta_fields,
        "shards": shards,
        "checksums": checksums,
    }
    save_meta(folder, meta)
