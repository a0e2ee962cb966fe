"""Loading a backbone and its tokenizer from a Hub id, a local folder or a GGUF file: one place for every stage."""

import os

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
    source, gguf_file = split_gguf(backbone)
    return AutoModel.from_pretrained(source, gguf_file=gguf_file, dtype=DTYPES[dtype]).eval()


def load_tokenizer(source: str):
    source, gguf_file = split_gguf(source)
    return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
