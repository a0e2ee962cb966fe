# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The settings that several commands share, each declared once (as TRL shares `ModelConfig` across its scripts).

    DtypeSettings     dtype                          the dtype a backbone or a checkpoint is loaded in
    DeviceSettings    device                         where it runs
    BatchSettings     batch_size, max_batch_tokens   conversations and padded tokens per forward pass
    LengthSettings    max_length, truncate_prompt    the length policy of a scored conversation

A command's settings dataclass inherits the groups it uses (`class ExtractSettings(LengthSettings, BatchSettings,
DeviceSettings, DtypeSettings)`), so each knob has one declaration, one default, one help text and one flag name in every command
(`HfArgumentParser` makes `--dtype`, `--batch-size`, `--max-length`, `--truncate-prompt` of them). The functions of
the scoring path take their defaults from here (`DEFAULT_BATCH_SIZE`), and every loader runs a model in the dtype
`resolve_dtype` picks for its device.

`Location` types a setting that names a file, a folder or a Hub id: the stage reports write such values relative to
their folder (`armorm_io.reports`).
"""

import dataclasses
import functools
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NewType

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "BACKENDS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_LENGTH",
    "DTYPES",
    "BackendSettings",
    "BatchSettings",
    "DeviceSettings",
    "DtypeSettings",
    "EMULATED_HALF_SLOWDOWN",
    "LengthSettings",
    "Location",
    "SettingsGroup",
    "cpu_computes_natively",
    "fields_in_order",
    "fit_dtype",
    "is_list_type",
    "location_fields",
    "normalize_locations",
    "resolve_device",
    "resolve_dtype",
    "torch_dtype",
]

# The type of a setting that names a file, a folder or a Hub id.
Location = NewType("Location", str)

# "auto": the dtype the weights were saved in, but float32 for a half dtype on a CPU that only emulates it.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 4096
# How much slower bfloat16 runs than float32 on a CPU without native bfloat16: `armorm extract` on SmolLM2-135M, 2
# AVX2 cores, took 1,624 s for 16 answers in bfloat16 and 370 s in float32 (float16 is emulated alike).
EMULATED_HALF_SLOWDOWN = "about 4x"
HALF_DTYPES = (torch.bfloat16, torch.float16)


def torch_dtype(name: str) -> "torch.dtype | str":
    """The `dtype=` argument of `from_pretrained` for a `--dtype` value; a `ValueError` names the choices."""
    if name not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has kernels for `dtype` (oneDNN's test, the one torch's own bfloat16/float16 matmuls take: AVX512,
    AMX or AVX-NE-CONVERT on x86, the BF16/FP16 extensions on ARM); without them torch emulates a half dtype."""
    if dtype not in HALF_DTYPES:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def resolve_dtype(dtype: "str | torch.dtype", device: "str | torch.device", saved_dtype: torch.dtype) -> torch.dtype:
    """The dtype a model saved in `saved_dtype` runs in on `device`, for a `--dtype` value (or a `torch.dtype`).

    `auto` is `saved_dtype`, except a half dtype (bfloat16, float16) on a CPU that only emulates it
    (`cpu_computes_natively`): float32 there, which runs about 4x faster. A half dtype asked for by name on such a CPU
    is kept, with one warning per process. On a GPU, `auto` is always the saved dtype."""
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    on_cpu = torch.device(device).type == "cpu"
    if dtype == "auto":
        return torch.float32 if on_cpu and not cpu_computes_natively(saved_dtype) else saved_dtype
    if on_cpu and not cpu_computes_natively(dtype):
        _warn_emulated(dtype)
    return dtype


@functools.cache
def _warn_emulated(dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    logger.warning(
        f"This CPU has no native {name}, so torch emulates it: a forward runs {EMULATED_HALF_SLOWDOWN} slower than in "
        f"float32 (measured on SmolLM2-135M). Pass `--dtype float32` (`dtype=torch.float32`), or `auto`, for speed."
    )


def fit_dtype(model: torch.nn.Module, dtype: "str | torch.dtype", device: "str | torch.device") -> torch.nn.Module:
    """`model`, loaded with `torch_dtype(dtype)`, in the dtype `resolve_dtype` picks for `device`: cast (in place) to
    float32 where `auto` met a half dtype that `device` only emulates, else as it is. The heads are float32 already."""
    if resolve_dtype(dtype, device, model.dtype) == torch.float32 and model.dtype != torch.float32:
        return model.to(torch.float32)
    return model


def resolve_device(device: str | None, local_rank: int | None = None) -> torch.device:
    """`device` as given, else this process's GPU (`cuda:<local_rank>` under torchrun), else the CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}" if local_rank is not None else "cuda")


class SettingsGroup:
    """The base of every settings group and the end of their `__post_init__` chain: each group checks its own fields,
    then calls the next in the MRO. A group declared elsewhere (`conversion.support.SupportSettings`) inherits it too."""

    def __post_init__(self):
        pass


@dataclass(kw_only=True)
class DtypeSettings(SettingsGroup):
    """The dtype a backbone or a checkpoint is loaded in."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "Backbone dtype (`auto`: as saved, but a model that torch runs on a CPU without native "
            "bfloat16/float16 runs in float32, about 4x faster there); the heads stay float32, stored features are "
            "float32."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        torch_dtype(self.dtype)


@dataclass(kw_only=True)
class DeviceSettings(SettingsGroup):
    """Where the work runs."""

    device: str | None = field(
        default=None,
        metadata={"help": "`cpu`, `cuda`, `cuda:1`, … (default: this process's GPU under torchrun, a GPU, the CPU)."},
    )


@dataclass(kw_only=True)
class BatchSettings(SettingsGroup):
    """How many conversations run in one forward pass (sorted by length first, so little padding), and how many
    padded tokens."""

    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "Conversations per forward pass."})
    max_batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Padded tokens per forward pass (rows x the longest row): a batch holds at most `batch_size` rows "
            "and no more than fit this budget (default on a CPU, where a forward costs its padded tokens: 4096 where "
            "the batches run packed, 1024 where they run padded (a backbone that cannot pack); rows only on a GPU)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {self.batch_size}.")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"`max_batch_tokens` must be at least 1, got {self.max_batch_tokens}.")


@dataclass(kw_only=True)
class LengthSettings(SettingsGroup):
    """The length policy: a conversation longer than `max_length` tokens is refused (a data row is skipped and
    listed), or with `truncate_prompt` loses its earliest prompt turns until it fits. An answer is never cut."""

    max_length: int = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={
            "help": "Longest conversation in tokens (the backbone's `max_position_embeddings` binds too); longer "
            "ones are refused, or skipped and listed in a data set."
        },
    )
    truncate_prompt: bool = field(
        default=False,
        metadata={
            "help": "Drop earlier prompt turns (never the system turn, the last user turn or an answer) to fit."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1:
            raise ValueError(f"`max_length` must be at least 1, got {self.max_length}.")


@dataclass(kw_only=True)
class ScaleSettings(SettingsGroup):
    """The score's scale: raw, or normalized by the reference answers' statistics the checkpoint records."""

    normalize: bool = field(
        default=False,
        metadata={
            "help": "Return each score as (s - mean) / std of the checkpoint's reference answers "
            "(`config.score_statistics`, recorded by `armorm assemble`); rewards and gating weights stay raw."
        },
    )


BACKENDS = ("transformers", "vllm")


@dataclass(kw_only=True)
class BackendSettings(SettingsGroup):
    """Which engine runs the checkpoint: transformers in this process, or vLLM's engine with this package's plugin."""

    backend: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={
            "help": "`transformers` (this process; the answers to one prompt run it once) or `vllm` (vLLM's engine "
            'with this package\'s plugin: pip install "armorm[vllm]").'
        },
    )
    vllm_engine_args: str = field(
        default="{}",
        metadata={
            "help": 'vLLM backend: vLLM engine arguments as JSON, e.g. `{"tensor_parallel_size": 2, '
            '"gpu_memory_utilization": 0.5}` (`model` comes from `--model`, `dtype` from `--dtype` unless given here).'
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {self.backend!r}.")
        self.engine_arguments()

    def engine_arguments(self, model: str | None = None, dtype: str = "auto") -> dict:
        """`vllm_engine_args` as a dict, with the dtype: `dtype`, where "auto" means as the checkpoint `model` was
        saved (vLLM's own "auto" would run a float32 checkpoint in half precision), unless the JSON sets one."""
        try:
            arguments = json.loads(self.vllm_engine_args)
        except json.JSONDecodeError as error:
            raise ValueError(f"`vllm_engine_args` is not JSON ({error}): give an object such as '{{}}'.") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"`vllm_engine_args` must be a JSON object, got {self.vllm_engine_args!r}.")
        taken = sorted({"model", "runner"} & set(arguments))
        if taken:
            raise ValueError(f"`vllm_engine_args` sets {taken}, which armorm sets itself (`--model`); drop them.")
        if model is not None and "dtype" not in arguments:
            saved = Path(model) / "config.json"
            if dtype == "auto" and saved.is_file():
                saved = json.loads(saved.read_text())
                dtype = saved.get("dtype") or saved.get("torch_dtype") or "auto"
            arguments["dtype"] = dtype
        return arguments


def normalize_locations(config) -> None:
    """Called by each settings dataclass's `__post_init__`: `Location` values as `str` (a `pathlib.Path` is
    accepted), and a list-valued one given as a single value (`features="folder"`) as a one-item list."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if name not in location_fields(type(config)) or (value := getattr(config, name)) is None:
            continue
        if is_list_type(hint) and isinstance(value, (str, os.PathLike)):
            value = [value]
        setattr(config, name, [os.fspath(v) for v in value] if is_list_type(hint) else os.fspath(value))


def is_list_type(hint) -> bool:
    """Whether a field's type is a list (or an optional list)."""
    return typing.get_origin(hint) is list or any(typing.get_origin(arg) is list for arg in typing.get_args(hint))


def location_fields(config_class) -> set[str]:
    """The fields of a settings dataclass typed `Location` (or a list / optional of it)."""
    names = set()
    for name, hint in typing.get_type_hints(config_class).items():
        args = typing.get_args(hint)
        if hint is Location or Location in args or any(Location in typing.get_args(arg) for arg in args):
            names.add(name)
    return names


def fields_in_order(config_class) -> list[dataclasses.Field]:
    """The fields of a settings dataclass, those its own class declares (what a command reads and writes) first, then
    each inherited group's, from the most derived class to the shared groups above."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    ordered = []
    for klass in config_class.__mro__:
        for name in klass.__dict__.get("__annotations__", {}):
            if name in fields and fields[name] not in ordered:
                ordered.append(fields[name])
    return ordered
