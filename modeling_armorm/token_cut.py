# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Where the tokens of a conversation can be cut, so that a prompt shared by many answers is tokenized once.

A fast tokenizer first cuts its input at the added tokens it finds there (`<|eot_id|>`, `<|im_start|>`, ...), then
normalizes, pre-tokenizes and tokenizes each piece between them on its own. So where the rendered prompt's last added
token S is found at its place whatever text follows, the tokens of the whole conversation are the prompt's tokens
before S followed by the tokens of the text from S on:

    ids(prompt + answer) == ids(prompt)[:token] + ids(prompt[start:] + answer)        (S at `start`, token `token`)

GRPO sends 8-64 answers to one prompt: the prompt is rendered and tokenized once, and each answer costs the tokens of
S, the generation prompt's tail (`\\n\\n`) and its own text, instead of the whole conversation's.

`TokenCuts.find` gives the cut only where this holds for every continuation of the prompt:

* S is a token of the prompt's tokenization at exactly the characters of its text (offsets), not normalized and with
  none of `lstrip`, `rstrip`, `single_word` (each of which reads the characters around S, which differ between the two
  tokenizations);
* no added token could be found across S and the end of the prompt, which the answer's first characters would
  complete: no text of the prompt that starts before S ends is a proper prefix of an added token's text. An added token
  is matched leftmost and longest, so S is then found at `start` in every continuation, and matching resumes after it
  on the same text in both tokenizations;
* and, checked by the caller, the prompt's text from S on tokenizes to the prompt's tokens from S on.

A slow (Python) tokenizer gives no offsets: it gets no cut, and each conversation is tokenized whole.
"""

from typing import NamedTuple


__all__ = ["Cut", "TokenCuts"]


class Cut(NamedTuple):
    start: int  # the character where S starts in the prompt's text
    token: int  # S's index in the prompt's tokens


class TokenCuts:
    """The added tokens of `tokenizer`, read once, and where a rendered prompt's tokens can be cut (`find`)."""

    def __init__(self, tokenizer):
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.enabled = bool(getattr(tokenizer, "is_fast", False) and added)
        # Only tokens matched on the raw text, exactly where their text stands, may be cut at.
        self.cut_tokens = {
            i: t.content
            for i, t in added.items()
            if t.content and not (t.normalized or t.lstrip or t.rstrip or t.single_word)
        }
        texts = [t.content for t in added.values() if t.content]
        self.longest = max(map(len, texts), default=0)
        self.proper_prefixes = {text[:n] for text in texts for n in range(1, len(text))}

    def find(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> Cut | None:
        """The cut of the prompt `text` (tokenized as `ids`, at `offsets`): its last added token, where no continuation
        can move it; None where there is none."""
        if not self.enabled:
            return None
        for token in range(len(ids) - 1, -1, -1):
            content = self.cut_tokens.get(ids[token])
            start, end = offsets[token]
            if content is not None and text[start:end] == content and end - start == len(content):
                break
        else:
            return None
        # A match across S (starting before S ends) that reaches past the prompt would depend on the answer.
        for q in range(max(0, len(text) - self.longest + 1), end):
            if text[q:] in self.proper_prefixes:
                return None
        return Cut(start, token)
