"""Content keys of conversations and pairs, and the seeded split every stage draws from them.

A key is the first 8 bytes of the sha256 of a canonical JSON of the messages (role and content of each turn), read as
a signed int64 so that it fits a safetensors tensor next to the features. The same prompt, or the same pair, has the
same key in every file and every stage: `armorm bt` records the keys of the pairs it trained on, `armorm extract`
stores the keys of every pair it reads, and a split by `held_out` of the prompt key puts a prompt's pairs on one side
in the Bradley-Terry stage and in the gate alike.
"""

import hashlib
import json

import numpy as np
import torch


__all__ = ["conversation_key", "held_out", "pair_key", "prompt_key"]


def conversation_key(messages: list[dict]) -> int:
    """The int64 key of a list of messages (only `role` and `content` count)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[:8], "little", signed=True)


def prompt_key(conversation: list[dict]) -> int:
    """The key of a conversation's prompt: every turn but the answer."""
    return conversation_key(conversation[:-1])


def pair_key(chosen: list[dict], rejected: list[dict]) -> int:
    """The key of a preference pair: its prompt, the chosen answer, then the rejected one (order matters)."""
    return conversation_key([*chosen, rejected[-1]])


def held_out(keys: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A row is held out when a seeded hash of its int64 key (a source index or a content key) falls below
    `fraction`. The hash (splitmix64) depends on the key alone, so the split is the same however the rows were
    sharded, ordered or filtered."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"The held-out fraction must be in [0, 1), got {fraction}.")

    def splitmix64(x: np.ndarray) -> np.ndarray:
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        seed_key = splitmix64(np.array([seed], dtype=np.int64).astype(np.uint64))
        hashed = splitmix64(torch.as_tensor(keys).numpy().astype(np.int64).astype(np.uint64) ^ seed_key)
    uniform = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # in [0, 1)
    return torch.from_numpy(uniform < fraction)
