"""Loading a backbone and its tokenizer from a Hub id, a local folder or a GGUF file: one place for every stage."""

import functools
import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from armorm_io.files import Fingerprint, check_location, file_sha256, hub_unreachable
from modeling_armorm.settings import torch_dtype


def split_gguf(source: str) -> tuple[str, str | None]:
    """(folder or Hub repo, GGUF file name or None) for a `--backbone`/`--tokenizer` value."""
    if not source.endswith(".gguf"):
        return source, None
    if os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    if os.path.isabs(source) or source.startswith("."):
        raise FileNotFoundError(f"`{source}`: no such GGUF file.")
    repo, _, name = source.rpartition("/")  # a Hub file: `org/repo/file.gguf`
    return repo, name


def load_backbone(backbone: str, dtype: str = "auto") -> PreTrainedModel:
    """The backbone without its LM head (`AutoModel`), in `dtype` ("auto": the dtype it was saved in).

    A GGUF file is dequantized to float32 on load; its quantizer flag stays on this model, which is why
    `armorm assemble` copies only its state dict into a checkpoint."""
    dtype = torch_dtype(dtype)
    check_backbone(backbone)
    source, gguf_file = split_gguf(backbone)
    return _from_local_or_hub(AutoModel, source, gguf_file=gguf_file, dtype=dtype).eval()


def load_tokenizer(source: str):
    source, gguf_file = split_gguf(source)
    return _from_local_or_hub(AutoTokenizer, source, gguf_file=gguf_file)


def check_backbone(backbone: str) -> None:
    """Fail at once, before any data is read or model loaded, on a backbone that cannot be loaded: a local path that
    does not exist, or a Hub id while the Hub is offline and the model is not in the local cache."""
    source, _ = split_gguf(backbone)
    check_location(source, "The backbone")
    if not os.path.exists(source) and huggingface_hub.constants.HF_HUB_OFFLINE:
        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise hub_unreachable(source, "The backbone", OSError("not in the local cache"))


def _from_local_or_hub(auto_class, source: str, **kwargs):
    """`auto_class.from_pretrained(source)`, where a missing local path or an unreachable Hub id says so plainly."""
    check_location(source, "The backbone")
    if os.path.exists(source):
        return auto_class.from_pretrained(source, **kwargs)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as error:  # offline, unknown id, no access
        raise hub_unreachable(source, "The backbone", error) from error


def backbone_fingerprint(backbone: str) -> Fingerprint:
    """What identifies a backbone's content: the sha256 of a GGUF file, of every file of a local folder, or the
    revision of a Hub id's cached snapshot (None when it is not in the local cache)."""
    source, gguf_file = split_gguf(backbone)
    check_backbone(backbone)
    if gguf_file is not None and os.path.isfile(os.path.join(source, gguf_file)):
        return Fingerprint(backbone, _cached_sha256(os.path.join(source, gguf_file)))
    if os.path.isdir(source):
        files = sorted(p for p in Path(source).rglob("*") if p.is_file() and not p.name.startswith("."))
        listing = [[p.relative_to(source).as_posix(), _cached_sha256(str(p))] for p in files]
        return Fingerprint(backbone, hashlib.sha256(json.dumps(listing).encode()).hexdigest())
    cached = try_to_load_from_cache(source, "config.json")
    revision = Path(cached).parent.name if isinstance(cached, str) else None
    return Fingerprint(backbone, hashlib.sha256(f"{source}@{revision}".encode()).hexdigest() if revision else None)


def _cached_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_of(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and modification time too, so a file rewritten in place is hashed again.
    return file_sha256(path)
