"""The weight check of every converter and assembler: the tensors given must be exactly those the model expects.

Loud loading (as transformers' conversion scripts and nanoGPT's `from_pretrained` do it): build the model the config
describes on the meta device, compare key sets and shapes, and refuse with the key, both shapes and the fix, before
anything is loaded or saved. Never `strict=False` and hope.
"""

import torch

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling


__all__ = ["check_state_dict", "expected_shapes"]


def expected_shapes(config: ArmoRMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of `ArmoRMForRewardModeling(config)`'s state dict and its shape (no memory allocated)."""
    with torch.device("meta"):
        model = ArmoRMForRewardModeling(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state_dict(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str, hint: str, limit: int = 8
) -> None:
    """Raise a `ValueError` naming what `source` lacks, what it has too many of and every shape that differs."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    mismatched = [
        f"`{key}` has shape {tuple(found[key])}, the model expects {tuple(expected[key])}"
        for key in sorted(set(expected) & set(found))
        if tuple(found[key]) != tuple(expected[key])
    ]
    problems = [f"missing {missing[:limit]}"] * bool(missing) + [f"unexpected {unexpected[:limit]}"] * bool(unexpected)
    problems += mismatched[:limit]
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems) + f". {hint}")
