import hashlib
import json

import numpy as np
import torch

from armorm_io.pair_keys import conversation_key, held_out, pair_key, prompt_key
from conversion.fit import validation_mask


def independent_key(messages: list[dict]) -> int:
    """sha256 of the turns' [role, content] as compact JSON, first 8 bytes as a little-endian signed int64."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return int(np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], dtype="<i8")[0])


PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 ? «é»"}]
CHOSEN = [*PROMPT, {"role": "assistant", "content": "4"}]
REJECTED = [*PROMPT, {"role": "assistant", "content": "5"}]


def test_keys_equal_an_independent_hash_of_the_turns():
    assert conversation_key(CHOSEN) == independent_key(CHOSEN)
    assert prompt_key(CHOSEN) == prompt_key(REJECTED) == independent_key(PROMPT)
    assert pair_key(CHOSEN, REJECTED) == independent_key([*CHOSEN, REJECTED[-1]])
    assert pair_key(CHOSEN, REJECTED) != pair_key(REJECTED, CHOSEN), "the order states the preference"
    # Only role and content count: an extra field (a name, a tool id) does not change the key.
    assert conversation_key([{**m, "name": "x"} for m in CHOSEN]) == conversation_key(CHOSEN)
    # A turn boundary is part of the key: the same text split differently is another conversation.
    merged = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert conversation_key(merged) != conversation_key([{"role": "user", "content": "ab"}])


def test_held_out_is_seeded_near_the_fraction_and_row_local():
    keys = torch.tensor([independent_key([{"role": "user", "content": str(i)}]) for i in range(4000)])
    mask = held_out(keys, 0.25, seed=3)
    assert abs(mask.float().mean().item() - 0.25) < 0.03
    assert torch.equal(mask[::7], held_out(keys[::7], 0.25, seed=3)), "a key's side does not depend on the others"
    assert not torch.equal(mask, held_out(keys, 0.25, seed=4))
    assert not held_out(keys, 0.0, seed=3).any()
    # The ratings split of `armorm fit` is the same rule on source indices.
    index = torch.arange(1000)
    assert torch.equal(validation_mask(index, 0.2, 5), held_out(index, 0.2, 5))
