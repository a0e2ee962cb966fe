"""Convert a checkpoint in the released RLHFlow ArmoRM layout into an ArmoRM checkpoint of this package.

    armorm convert-rlhflow --src-dir SRC_DIR --out-dir OUT_DIR

The released `RLHFlow/ArmoRM-Llama3-8B-v0.1` ships a flat Llama `config.json` extended with `num_objectives` and
`gating_*` keys, and remote code that no longer imports on transformers 5. Its weights already carry this package's
state-dict names (`model.*`, `regression_layer.weight`, `gating.*`, `reward_transform_matrix`), so the conversion
builds an `ArmoRMConfig`, checks every tensor name and shape against the model it describes, loads the weights
unchanged and saves them with the config, the remote-code files and the tokenizer.
"""

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from armorm_io.files import make_readable
from conversion.state_dict import check_state_dict, expected_shapes
from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling
from modeling_armorm.rlhflow import RLHFLOW_LAYOUT, rlhflow_config
from modeling_armorm.settings import Location, normalize_locations


logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ConvertConfig:
    """`armorm convert-rlhflow`: the released checkpoint and where its conversion goes."""

    src_dir: Location = field(metadata={"help": "Folder of the checkpoint in the released layout."})
    out_dir: Location = field(metadata={"help": "Where to write the ArmoRM checkpoint."})

    def __post_init__(self):
        normalize_locations(self)


ARGUMENTS = (ConvertConfig,)


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        hint = f" (found pickled weights {pickled}: convert them to safetensors first)" if pickled else ""
        raise ValueError(f"No *.safetensors weights in {src}{hint}; expected {RLHFLOW_LAYOUT}.")
    return files


def check_weights(src: Path, config: ArmoRMConfig) -> dict[str, str]:
    """Every tensor the model needs is in the files with its shape, and nothing else is (read from the headers).

    Returns the weight map (tensor name -> file name)."""
    found, weight_map = {}, {}
    for path in _weight_files(src):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                found[name] = tuple(f.get_slice(name).get_shape())
                weight_map[name] = path.name
    check_state_dict(found, expected_shapes(config), f"The weights in {src}", f"Expected {RLHFLOW_LAYOUT}.")
    return weight_map


def convert_rlhflow(src_dir: str, out_dir: str) -> ArmoRMForRewardModeling:
    src, out = Path(src_dir), Path(out_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"No config.json in {src}; expected {RLHFLOW_LAYOUT}.")
    src_config = json.loads(config_path.read_text())
    tokenizer = None
    if any((src / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(src)
    config = rlhflow_config(src_config, tokenizer)
    weight_map = check_weights(src, config)

    # Load through transformers from a staging folder: the new config, links to the unchanged weight files and an
    # index of them (however the release named or sharded its files).
    dtype = src_config.get("dtype") or src_config.get("torch_dtype") or "float32"
    with tempfile.TemporaryDirectory() as staging:
        config.save_pretrained(staging)
        for name in set(weight_map.values()):
            os.symlink((src / name).resolve(), Path(staging) / name)
        index = {"metadata": {}, "weight_map": weight_map}
        (Path(staging) / "model.safetensors.index.json").write_text(json.dumps(index))
        model, info = ArmoRMForRewardModeling.from_pretrained(
            staging, dtype=getattr(torch, dtype), output_loading_info=True
        )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"Loading the converted weights reported {problems}; nothing was written.")
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for extra in ("generation_config.json", "LICENSE"):
        if (src / extra).is_file() and not (out / extra).exists():
            shutil.copy(src / extra, out / extra)
    make_readable(out)
    logger.info(
        "Converted %s -> %s (%d objectives, gating pattern %s)", src, out, config.num_objectives,
        config.gating_token_pattern,
    )  # fmt: skip
    return model


def main(config: ConvertConfig | None = None, /, **kwargs) -> ArmoRMForRewardModeling:
    """Pass a `ConvertConfig`, or its fields as keywords."""
    config = config or ConvertConfig(**kwargs)
    return convert_rlhflow(config.src_dir, config.out_dir)
