"""Writing files so that a reader never sees half of one, and the content hashes that every stage records.

* `atomic_write(path, write)`: write through a temporary file in the same folder, then rename.
* `file_sha256(path)`: the sha256 of a file's bytes (shards, data files).
* `Fingerprint(path, sha256)`: a file or folder a stage read or wrote, and its content hash.
* `tensors_sha256(tensors, metadata)`: the sha256 of a tensor file's *content* (names, dtypes, shapes, values and
  metadata, in sorted order). safetensors writes its metadata keys in a random order, so two files with the same
  tensors can differ in bytes; this hash does not.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


__all__ = [
    "Fingerprint",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_location",
    "file_sha256",
    "hub_unreachable",
    "make_readable",
    "tensors_sha256",
]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A file or folder a stage read or wrote, and the content hash that identifies it (None: not hashable here,
    e.g. a Hub id that cannot be resolved offline)."""

    path: str
    sha256: str | None

    def as_dict(self, paths) -> dict:
        return {"path": paths(self.path), "sha256": self.sha256}


_HASH_CHUNK = 1 << 24
# Files the stages write are for every user of a shared machine to read (mkstemp creates them 0600).
_FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path` (a reader sees the old file or
    the whole new one, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def make_readable(folder: str | os.PathLike) -> None:
    """Give every file of `folder` the usual permissions (0644 under the umask): some writers (safetensors through
    `save_pretrained`) create them 0600, unreadable to the other users of a shared machine."""
    for path in Path(folder).iterdir():
        if path.is_file():
            os.chmod(path, _FILE_MODE & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes) and the metadata in key order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(metadata or {}, sort_keys=True).encode())
    return digest.hexdigest()


def check_location(value: str, what: str) -> None:
    """Refuse a `what` (`--backbone`, `--data`, …) that names a local path that does not exist, with one message
    that says so (not a Hub error about repo ids). Anything else is left for the loaders: a Hub id, or a path."""
    if os.path.exists(value):
        return
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or value.endswith(os.sep)
    if looks_local:
        raise FileNotFoundError(f"{what} `{value}` does not exist. Check the path (an absolute path is safest).")


def hub_unreachable(value: str, what: str, error: Exception) -> FileNotFoundError:
    """The error for a Hub id that could not be loaded (offline, unknown, no access): it names the id and says how
    to pass a local copy instead."""
    offline = " the Hub is offline here (HF_HUB_OFFLINE=1) and" if _hub_offline() else ""
    return FileNotFoundError(
        f"{what} `{value}` is not a local path, and{offline} it could not be loaded from the Hub "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Download it where the "
        f"Hub is reachable (`hf download {value}`, with `--repo-type dataset` for data) and pass its local folder "
        "or file (an absolute path is safest)."
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
