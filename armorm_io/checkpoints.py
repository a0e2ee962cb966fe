"""An assembled ArmoRM checkpoint as the scoring stages read it: its content hash and the model on a device.

`armorm evaluate` and `armorm annotate` both load a checkpoint and record which one they scored with; both do it here.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from armorm_io.backbone import backbone_fingerprint
from armorm_io.files import Fingerprint, file_sha256
from modeling_armorm import ArmoRMForRewardModeling
from modeling_armorm.settings import fit_dtype, torch_dtype


__all__ = ["NOT_SCORED", "load_model", "model_fingerprint"]

# Files of a checkpoint folder that never change a score: the card, which `armorm build --eval` rewrites with the
# evaluation's results, and the assembly report.
NOT_SCORED = ("README.md", "assemble.json")


def model_fingerprint(model: str) -> Fingerprint:
    """What identifies a checkpoint's scores: the sha256 of every file of a local folder but its card and assembly
    report (`NOT_SCORED`), or what `backbone_fingerprint` gives for a Hub id."""
    if not os.path.isdir(model):
        return backbone_fingerprint(model)
    files = sorted(
        p for p in Path(model).rglob("*") if p.is_file() and not p.name.startswith(".") and p.name not in NOT_SCORED
    )
    listing = [[p.relative_to(model).as_posix(), file_sha256(p)] for p in files]
    return Fingerprint(model, hashlib.sha256(json.dumps(listing).encode()).hexdigest())


def load_model(model: str, dtype: str = "auto", device: torch.device | str = "cpu") -> ArmoRMForRewardModeling:
    """The checkpoint on `device`, in the dtype `resolve_dtype` picks for `dtype` there."""
    loaded = ArmoRMForRewardModeling.from_pretrained(model, dtype=torch_dtype(dtype)).eval()
    return fit_dtype(loaded, dtype, device).to(device)
