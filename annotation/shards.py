# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Content-keyed shards: what makes `armorm annotate` resume after any interruption and never reuse stale scores.

The prompts are cut into chunks of `shard_prompts` in data order. A chunk's scores are saved as one safetensors file,
`shards/<key>.safetensors`, where the key is the sha256 of everything that decides those numbers:

    key = sha256(chunk content: each prompt's messages and answers,
                 the checkpoint's content hash,
                 the scorer's identity: backend, dtype, device type, batch size, token budget,
                 the length policy: max_length, truncate_prompt)

A rerun finds the shards of the chunks already done and scores only the others, so a run killed at any point (even
with SIGKILL: every shard is written to a temporary file and renamed) ends with the files an uninterrupted run
writes. A chunk whose content changed (one answer edited) has another key and is scored again; the shards no chunk of
the finished run uses are deleted.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from armorm_io.files import atomic_write


__all__ = ["FORMAT", "chunk_key", "load_shard", "prune_shards", "save_shard", "shard_path"]

# Bumped when a shard's content changes meaning, so that shards of an older format are never read.
FORMAT = 1
TENSORS = ("score", "rewards", "gating_output")


def chunk_key(chunk, identity: dict) -> str:
    """The sha256 that names chunk `chunk` (a list of `Candidates`) scored by a scorer of `identity`."""
    content = {
        "format": FORMAT,
        "identity": identity,
        "prompts": [[item.prompt, item.answers] for item in chunk],
    }
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def shard_path(folder: str | os.PathLike, key: str) -> Path:
    return Path(folder) / f"{key}.safetensors"


def save_shard(folder: str | os.PathLike, key: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
    """`tensors` (`TENSORS`, one row per answer of the chunk, NaN where unscored) and `record` (`reasons`: the answers
    that have no score and why, `tokens`: the tokens scored), written atomically."""
    # One metadata key: safetensors writes several in a random order, and a resumed run must write the same bytes.
    metadata = {"record": json.dumps({"format": FORMAT, **record}, ensure_ascii=False, sort_keys=True)}
    tensors = {name: tensors[name].contiguous() for name in TENSORS}
    atomic_write(shard_path(folder, key), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_shard(folder: str | os.PathLike, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A chunk's tensors and record, or None when its shard is missing or unreadable (then it is scored again)."""
    path = shard_path(folder, key)
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        record = json.loads(metadata["record"])
        if record.pop("format", None) != FORMAT or set(tensors) != set(TENSORS):
            return None
        return tensors, record
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def prune_shards(folder: str | os.PathLike, keep: set[str]) -> list[str]:
    """Delete the shards of `folder` whose key is not in `keep` (and temporary files a killed run left); returns the
    names deleted."""
    folder = Path(folder)
    deleted = []
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob(".*.tmp")):
        if path.stem not in keep:
            path.unlink()
            deleted.append(path.name)
    return deleted
