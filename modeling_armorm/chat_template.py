"""The gating pattern of a chat template: the tokens between the prompt's last message and the final answer.

The prompt feature h_x is read at the first token of the last occurrence of this pattern (arXiv 2406.12845 §3.2: the gating network reads the prompt's feature): for
Llama-3 the `<|eot_id|>` of `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`, for ChatML the
`<|im_end|>` of `<|im_end|>\\n<|im_start|>assistant\\n`.
"""

from typing import NamedTuple


# Probe contents: plain words that no template rewrites and that no tokenizer merges with the markup around them.
_PROMPT_PROBE = "Armorm prompt probe"
_ANSWER_PROBE = "Armorm answer probe"


class GatingPattern(NamedTuple):
    token_ids: list[int]
    offset: int
    text: str

    def config_kwargs(self) -> dict:
        """The `ArmoRMConfig` fields this pattern sets."""
        return {
            "gating_token_pattern": list(self.token_ids),
            "gating_token_offset": self.offset,
            "gating_token_pattern_text": self.text,
        }


def _ids(tokenizer, text: str) -> list[int]:
    # The rendered template already holds its special tokens (BOS included): add none.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _probe_text(tokenizer) -> str:
    messages = [{"role": "user", "content": _PROMPT_PROBE}, {"role": "assistant", "content": _ANSWER_PROBE}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def end_of_turn_text(tokenizer) -> str:
    """The text the chat template writes after the last assistant answer (ChatML: `<|im_end|>\\n`)."""
    text = _probe_text(tokenizer)
    return text[text.rfind(_ANSWER_PROBE) + len(_ANSWER_PROBE) :]


def gating_pattern_from_tokenizer(tokenizer) -> GatingPattern:
    """Derive the gating pattern from `tokenizer.chat_template`.

    Renders a two-turn conversation, cuts the text between the end of the user's content and the start of the
    assistant's, and checks that these tokens are the same alone as inside the whole conversation (a tokenizer
    could otherwise merge them with their neighbours, and the pattern would never match real inputs).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no `chat_template`, so the gating pattern cannot be derived. Set "
            "`tokenizer.chat_template` to the template the reward model is used with, or give the pattern "
            "explicitly (`gating_token_pattern=` in `ArmoRMConfig`)."
        )
    text = _probe_text(tokenizer)
    prompt_end = text.rfind(_PROMPT_PROBE) + len(_PROMPT_PROBE)
    answer_start = text.find(_ANSWER_PROBE, prompt_end)
    if text.rfind(_PROMPT_PROBE) < 0 or answer_start < 0:
        raise ValueError(
            "The chat template does not render the user's and the assistant's contents verbatim, so no gating "
            f"pattern can be read from it. Rendered probe: {text!r}. Give `gating_token_pattern=` explicitly."
        )
    separator = text[prompt_end:answer_start]
    before = _ids(tokenizer, text[:prompt_end])
    through = _ids(tokenizer, text[:answer_start])
    whole = _ids(tokenizer, text)
    pattern = through[len(before) :]
    if not separator or not pattern or through[: len(before)] != before or whole[: len(through)] != through:
        raise ValueError(
            f"The chat template's separator between prompt and answer ({separator!r}) does not tokenize to a "
            "stable run of tokens, so it cannot locate the prompt feature. Use a template whose assistant header "
            "is separated from the contents, or give `gating_token_pattern=` explicitly."
        )
    return GatingPattern(token_ids=pattern, offset=0, text=tokenizer.decode(pattern))


_TURN_PROBE = "Armorm turn probe"


def _stable_run(tokenizer, text: str, start: int, end: int) -> list[int] | None:
    """The token ids of `text[start:end]` as they occur inside `text`, or None where the tokenizer merges them with
    their neighbours (the run would then never match real inputs)."""
    before, through, whole = _ids(tokenizer, text[:start]), _ids(tokenizer, text[:end]), _ids(tokenizer, text)
    if through[: len(before)] != before or whole[: len(through)] != through or len(through) == len(before):
        return None
    return through[len(before) :]


def turn_header_patterns_from_tokenizer(tokenizer) -> dict[str, list[int]]:
    """The token ids of each role's turn header in `tokenizer.chat_template` (`ArmoRMConfig.turn_header_patterns`).

    Renders a user turn, an assistant turn and a turn of each role, and cuts the text between the end-of-turn text
    and the role's content: ChatML's `<|im_start|>user\\n`, Llama-3's `<|start_header_id|>user<|end_header_id|>\\n\\n`.
    A role is left out where the template refuses it (Gemma has no system turn), renders it under another role's
    header, or writes a header without a special token (plain text that any answer could hold) or that does not
    tokenize to a stable run of tokens. The model uses them to refuse raw token ids that are not one prompt and one
    answer.
    """
    end_of_turn = end_of_turn_text(tokenizer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    prompt = [{"role": "user", "content": _PROMPT_PROBE}, {"role": "assistant", "content": _ANSWER_PROBE}]
    headers = {}
    for role in ("assistant", "system", "user", "tool"):
        try:
            text = tokenizer.apply_chat_template([*prompt, {"role": role, "content": _TURN_PROBE}], tokenize=False)
        except Exception:  # a template that refuses the role (Jinja's `raise_exception`) has no header for it
            continue
        after = text.find(_ANSWER_PROBE) + len(_ANSWER_PROBE)
        start, end = after, text.find(_TURN_PROBE, after)
        if after < len(_ANSWER_PROBE) or end < 0:
            continue
        if end_of_turn and text.startswith(end_of_turn, start):
            start += len(end_of_turn)
        ids = _stable_run(tokenizer, text, start, end)
        if ids and special & set(ids) and ids not in headers.values():
            headers[role] = ids
    return headers
