# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The length policy of a scored data row: refuse it, or drop its earliest prompt turns until it fits.

A data row holds one conversation per side (a rating: one; a pair: the chosen and the rejected answer to one prompt).
`ConversationEncoder.encode(rows)` encodes every side with `scoring.ChatEncoder` (the gating position from the
rendering) and returns, per row, an `EncodedRow` or the reason it cannot be scored. A row longer than `max_length`
tokens (or the backbone's `max_position_embeddings`) is refused, or with `truncate_prompt` loses its earlier prompt
turns, every side the same ones, so a pair keeps one prompt feature. An answer is never cut. `armorm extract`,
`armorm evaluate` and the `reward-scoring` pipeline share it (`LengthSettings` holds the two knobs).
"""

from dataclasses import dataclass

import jinja2

from .scoring import ChatEncoder, EncodedConversation


__all__ = ["ConversationEncoder", "EncodedRow"]


@dataclass
class EncodedRow:
    """One data row as token ids: one sequence per side (ratings: 1, pairs: chosen then rejected)."""

    sides: list[EncodedConversation]
    dropped_turns: int = 0  # prompt messages dropped by `truncate_prompt`

    @property
    def input_ids(self) -> list[list[int]]:
        return [side.input_ids for side in self.sides]


def _truncation_starts(messages: list[dict]) -> list[int]:
    """Where the kept prompt may start (after the leading system turns), from the fewest turns dropped to the most.

    The last prompt message (the last user turn) is always kept, and a kept prompt starts with a user turn so that
    templates which require alternating roles still render it.
    """
    prompt = messages[:-1]
    n_system = next((i for i, message in enumerate(prompt) if message["role"] != "system"), len(prompt))
    last = len(prompt) - 1
    return [i for i in range(n_system + 1, last + 1) if prompt[i]["role"] == "user" or i == last]


def _drop_turns(messages: list[dict], start: int) -> list[dict]:
    n_system = next((i for i, message in enumerate(messages) if message["role"] != "system"), len(messages))
    return messages[:n_system] + messages[start:]


class ConversationEncoder:
    """`ChatEncoder` plus the length policy: `encode(rows)` takes rows as lists of sides (each side a full
    conversation ending with the answer) and returns, per row, an `EncodedRow` or the reason it is skipped."""

    def __init__(
        self, tokenizer, max_length: int, truncate_prompt: bool, position_limit: int | None = None, pattern=None
    ):
        self.encoder = ChatEncoder(tokenizer, pattern)  # `pattern`: a model's own (`model_gating_pattern`)
        self.pattern = self.encoder.pattern
        # The backbone's own limit binds too: past `max_position_embeddings` it was never trained.
        self.max_length = min(max_length, position_limit or max_length)
        self.limit_name = "max_length" if self.max_length == max_length else "the backbone's max_position_embeddings"
        self.truncate_prompt = truncate_prompt

    def encode(self, rows: list[list[list[dict]]]) -> list["EncodedRow | str"]:
        return [self._fit(sides) for sides in rows]

    def _encode_sides(self, sides: list[list[dict]]) -> list[EncodedConversation]:
        return [self.encoder.encode(side) for side in sides]

    def _fit(self, sides: list[list[dict]]) -> "EncodedRow | str":
        try:
            encoded = self._encode_sides(sides)
        except (jinja2.TemplateError, ValueError, TypeError) as error:
            return f"the chat template cannot render this conversation: {error}"
        longest = max(map(len, encoded))
        if longest <= self.max_length:
            return EncodedRow(encoded)
        if not self.truncate_prompt:
            return (
                f"too long: {longest} tokens > {self.limit_name} {self.max_length} (raise `--max-length` or pass "
                "`--truncate-prompt` to drop earlier prompt turns)"
            )
        # Both sides share the prompt, so both drop the same turns: the prompt feature stays one feature.
        for start in _truncation_starts(sides[0]):
            shorter = [_drop_turns(side, start) for side in sides]
            encoded = self._encode_sides(shorter)
            longest = max(map(len, encoded))
            if longest <= self.max_length:
                return EncodedRow(encoded, dropped_turns=len(sides[0]) - len(shorter[0]))
        return (
            f"too long: {longest} tokens > {self.limit_name} {self.max_length} even with only the system turn, the "
            "last user turn and the response kept (responses are never cut; raise `--max-length`)"
        )
