# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The one scoring path: conversations → tokens and gating positions → length-sorted batches → per-row outputs.

Every caller that renders conversations itself goes through here: `armorm extract` (backbone features),
`armorm evaluate`, `ArmoRMReward` (TRL) and the `reward-scoring` pipeline.

* **Rendering.** A conversation is rendered with the tokenizer's chat template. The gating position (where h_x is
  read) comes from the rendering, never from a search in the tokens: the prompt rendered with the generation prompt
  ends with the gating pattern, so h_x is read at that pattern's first token. An answer that writes the template's
  own markup (`Sure.<|im_end|>\\n<|im_start|>assistant\\n…`) therefore cannot move h_x into itself.
* **Every message's content is text.** Only the template's own markup is chat structure: each message's content
  (the answer and the earlier turns, which a policy wrote in multi-turn RL) is located in the rendering and tokenized
  with `split_special_tokens=True`, so markup in it stays plain text and cannot forge a turn. A conversation without
  markup is tokenized exactly as `tokenizer.apply_chat_template(messages)` tokenizes it.
* **Batching.** Sequences are sorted by length (little padding), right-padded, run, and put back in the caller's
  order. The last real token comes from the attention mask and positions are counted over real tokens, so any pad
  id is safe.
"""

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .batching import default_max_tokens, length_sorted_batches, right_pad
from .chat_template import GatingPattern, end_of_turn_text, gating_pattern_from_tokenizer
from .heads import answer_lengths, last_token_positions, position_ids_from_mask
from .modeling_armorm import NonFiniteScoreError
from .packing import backbone_supports_packing, packed_features, score_packed, supports_packing
from .prefix_sharing import (
    backbone_supports_prefix_sharing,
    prefix_batches,
    prefix_features,
    run_prefix_batch,
    supports_prefix_sharing,
)
from .settings import DEFAULT_BATCH_SIZE
from .token_cut import Cut, TokenCuts


__all__ = [
    "ChatEncoder",
    "EncodedConversation",
    "Progress",
    "ROLES",
    "ScoreOutput",
    "collate",
    "conversation_features",
    "length_sorted_batches",
    "model_gating_pattern",
    "objective_names",
    "packs",
    "packs_backbone",
    "pad_token_id",
    "right_pad",
    "run_in_batches",
    "score_conversations",
    "score_encoded",
    "scoring_steps",
    "tokenizer_lock",
    "validate_messages",
]

Message = dict[str, str]
# Stands in for message j's content when the template is rendered to find its own text: private-use characters, which
# no template rewrites and which its markup never holds.
_SLOT = "\ue000armorm content {}\ue001"
# The roles a scored conversation may hold; the last message is the assistant's answer.
ROLES = ("system", "user", "assistant")
OUTPUT_FIELDS = ("score", "rewards", "gating_output", "coefficients")
# `split_special_tokens=True` flips a switch on the tokenizer's shared backend for the length of the call: two threads
# tokenizing with one tokenizer (AsyncGRPO's reward workers, a server) could read an answer's markup as special tokens,
# or the template's as text. Every call of the encoders holds its tokenizer's lock.
_TOKENIZER_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
# Prompts a `ChatEncoder` keeps rendered and tokenized, the most recently used: a GRPO group's answers follow each other
# (as do a pair's two sides), so one prompt serves them all.
PROMPT_CACHE_SIZE = 64


def tokenizer_lock(tokenizer) -> threading.Lock:
    """The one lock of `tokenizer`, shared by every `ChatEncoder` built on it."""
    with _LOCKS_GUARD:
        return _TOKENIZER_LOCKS.setdefault(tokenizer, threading.Lock())


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else 0. Padding is masked out (the last real
    token and the positions come from the attention mask), so the choice never changes a score."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def check_encodable(text: str, where: str) -> None:
    """A `ValueError` naming `where` for text the tokenizer cannot take (a lone surrogate such as `"\\ud83d"`, common
    in scraped data, is no UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} cannot be encoded as UTF-8 ({error.reason} {text[error.start : error.end]!r} at character "
            f"{error.start}): repair the text (a lone surrogate is half of an emoji cut in two) or drop the row."
        ) from None


def validate_messages(messages, where: str = "the conversation") -> list[Message]:
    """`messages` as a list of `{"role", "content"}` dicts that ends with the assistant's answer after a prompt.

    Raises a `ValueError` that names `where` and the fix. An empty answer is allowed (it is scored as an empty
    answer: the template's end-of-turn tokens are its last real tokens); an empty prompt message is too. Only `role`
    and `content` are scored: a message with another key holding a value (an assistant's `tool_calls`, a `name`) is
    refused rather than scored without it (empty values, as `datasets` fills in missing keys, are ignored).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}.")
    checked = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {j} must be a dict with a string `content`, got {message!r:.80}.")
        if message.get("role") not in ROLES:
            raise ValueError(
                f"{where}: message {j} has role {message.get('role')!r}; a scored conversation holds only "
                f"{', '.join(ROLES)} turns (fold tool results into the user's turn)."
            )
        extra = sorted(k for k, v in message.items() if k not in ("role", "content") and v not in (None, "", [], {}))
        if extra:
            raise ValueError(
                f"{where}: message {j} has {', '.join(map(repr, extra))}, which the reward model does not score (it "
                "reads only `role` and `content`): write what matters into `content` as text, or drop the key."
            )
        check_encodable(message["content"], f"{where}: message {j}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "assistant":
        raise ValueError(
            f"{where} ends with a {checked[-1]['role']} turn, not the assistant's answer that is scored: append the "
            "answer, or drop the trailing turns"
        )
    if all(message["role"] == "assistant" for message in checked[:-1]):
        raise ValueError(f"{where} has no system or user turn before the answer, so it has no prompt")
    return checked


@dataclass
class EncodedConversation:
    """One conversation as token ids, with the gating position read from its rendering.

    `gating_position`: the index of h_x (the first token of the gating pattern that ends the rendered prompt).
    `answer_start`: the index of the answer's first token (after the generation prompt).
    """

    input_ids: list[int]
    gating_position: int
    answer_start: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def answer_length(self) -> int:
        """n, the answer's tokens after the gating position (the last token, len - 1, unpadded), as the model's length
        objective r_len = log(1 + n) counts them."""
        return answer_lengths(len(self.input_ids) - 1, self.gating_position)


class _Prompt(NamedTuple):
    """A prompt rendered with the generation prompt, and its tokens."""

    text: str
    ids: list[int]
    structured: bool  # its contents tokenized as text, apart from its markup
    cut: Cut | None  # where every conversation that continues it can be cut (`token_cut`)


class ChatEncoder:
    """Encode conversations for ArmoRM with `tokenizer`'s chat template (see the module docstring).

    The last `PROMPT_CACHE_SIZE` prompts are kept rendered and tokenized: answers to one prompt render it and tokenize
    it once, and each answer tokenizes only the text from the prompt's last added token on (`token_cut`), which gives
    exactly the tokens of the whole conversation.

    Args:
        tokenizer: the reward model's tokenizer, with the chat template it was trained with.
        pattern (`GatingPattern`, *optional*): the gating pattern; derived from the template when not given.
    """

    def __init__(self, tokenizer, pattern: GatingPattern | None = None):
        self.tokenizer = tokenizer
        self.pattern = pattern or gating_pattern_from_tokenizer(tokenizer)
        self.end_of_turn = end_of_turn_text(tokenizer)
        self._lock = tokenizer_lock(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        # The texts the tokenizer reads as special tokens (what `split_special_tokens=True` keeps as text).
        self._special_texts = ({t.content for t in added if t.special} | set(tokenizer.all_special_tokens)) - {""}
        # By their first two characters: a text holds a special text only where it holds its start.
        self._special_starts: dict[str, list[str]] = {}
        for special in self._special_texts:
            self._special_starts.setdefault(special[:2], []).append(special)
        # A special token matched on the normalized text could hide in a text that holds none of them as written.
        self._plain_by_text = not any(t.normalized for t in added if t.special)
        self._cuts = TokenCuts(tokenizer)
        self._prompts: OrderedDict[tuple, _Prompt] = OrderedDict()
        self._prompts_lock = threading.Lock()

    def _ids(self, text: str, plain: bool = False) -> list[int]:
        # The rendered template already holds its special tokens (BOS included): add none.
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _is_plain(self, text: str) -> bool:
        # No special token's text in it: it tokenizes the same with and without special tokens recognised.
        return not any(
            start in text and any(special in text for special in specials)
            for start, specials in self._special_starts.items()
        )

    def _prompt(self, key: tuple, make: Callable[[], _Prompt]) -> _Prompt:
        """The prompt of `key`, from the cache or made by `make` (a prompt that fails is not kept)."""
        with self._prompts_lock:
            prompt = self._prompts.get(key)
            if prompt is not None:
                self._prompts.move_to_end(key)
                return prompt
        prompt = make()
        with self._prompts_lock:
            self._prompts[key] = prompt
            if len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        return prompt

    def _tokenized_prompt(self, text: str) -> _Prompt:
        """A rendered prompt whose markup is all chat structure: its tokens, and where its continuations can be cut."""
        if not self._cuts.enabled:
            return _Prompt(text, self._ids(text), False, None)
        with self._lock:
            encoding = self.tokenizer(
                text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True
            )
        ids = list(encoding["input_ids"])
        cut = self._cuts.find(text, ids, encoding["offset_mapping"])
        if cut is not None and self._ids(text[cut.start :]) != ids[cut.token :]:
            cut = None
        return _Prompt(text, ids, False, cut)

    def _message_prompt(self, messages: list[Message], where: str) -> _Prompt:
        text = self._render(messages, generation_prompt=True)
        if all(self._is_plain(message["content"]) for message in messages):
            return self._tokenized_prompt(text)
        # Markup in an earlier turn stays text: the template's own text holds the only special tokens of the prompt.
        ids = [i for piece, content in self._segments(messages, text, where) for i in self._ids(piece, content)]
        return _Prompt(text, ids, True, None)

    def _segments(self, messages: list[Message], rendered: str, where: str) -> list[tuple[str, bool]]:
        """`rendered` (the prompt rendered with the generation prompt) cut into the template's own text (False) and
        the messages' contents (True), in order. The template's text is read from a rendering with a slot for each
        content; a content may be rendered as is or stripped of surrounding whitespace (Llama-3's `| trim`)."""
        slots = [_SLOT.format(j) for j in range(len(messages))]
        skeleton = self._render([{**m, "content": s} for m, s in zip(messages, slots)], generation_prompt=True)
        pieces, contents = [], []
        for slot, message in zip(slots, messages):
            if slot in skeleton:  # a template may drop a message's content
                before, skeleton = skeleton.split(slot, 1)
                pieces.append(before)
                contents.append(message["content"])
        pieces.append(skeleton)

        def written(content: str, start: int, after: str, last: bool) -> str | None:
            # How the template wrote `content` at `start`: as is, or stripped; the template's next text follows it.
            for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                end = start + len(candidate)
                if rendered.startswith(candidate, start) and (
                    rendered[end:] == after if last else rendered.startswith(after, end)
                ):
                    return candidate
            return None

        segments, start = [], 0
        for j, content in enumerate(contents):
            text = None
            if rendered.startswith(pieces[j], start):
                text = written(content, start + len(pieces[j]), pieces[j + 1], last=j == len(contents) - 1)
            if text is None:
                break
            segments += [(pieces[j], False), (text, True)]
            start += len(pieces[j]) + len(text)
        if len(segments) != 2 * len(contents) or rendered[start:] != pieces[-1]:
            raise ValueError(
                f"{where}: the chat template rewrites a message's content, so its text cannot be told from the "
                "template's markup. Use the reward model's own tokenizer, or pass token ids with `gating_positions=`."
            )
        return [*segments, (pieces[-1], False)]

    def encode(self, messages, where: str = "the conversation") -> EncodedConversation:
        """Tokens and gating position of one conversation; a `ValueError` names `where` and the problem."""
        messages = validate_messages(messages, where)
        key = ("messages", *((message["role"], message["content"]) for message in messages[:-1]))
        prompt = self._prompt(key, lambda: self._message_prompt(messages[:-1], where))
        full_text = self._render(messages, generation_prompt=False)
        if not full_text.startswith(prompt.text) or not full_text.endswith(self.end_of_turn):
            raise ValueError(
                f"{where}: the chat template does not render it as the prompt (with the generation prompt) followed by "
                "the answer and the end-of-turn text, so the gating position cannot be read from the rendering. "
                "Use the reward model's own tokenizer, or pass token ids with `gating_positions=`."
            )
        answer_text = full_text[len(prompt.text) : len(full_text) - len(self.end_of_turn)]
        return self._encode_parts(prompt, answer_text, where)

    def encode_rendered(self, prompt_text: str, answer: str, where: str = "the conversation") -> EncodedConversation:
        """A prompt already rendered with the template (generation prompt included) and a plain-text answer.

        The rendered prompt's markup is taken as chat structure, all of it: markup that an earlier turn's content
        held cannot be told from the template's once rendered. Pass message lists to `encode` where a policy wrote
        earlier turns."""
        check_encodable(prompt_text, f"{where}: the prompt")
        check_encodable(answer, f"{where}: the answer")
        prompt = self._prompt(("rendered", prompt_text), lambda: self._tokenized_prompt(prompt_text))
        return self._encode_parts(prompt, answer, where)

    def _whole_ids(self, prompt: _Prompt, answer_text: str) -> list[int]:
        """The tokens of the whole conversation's text (`token_cut`: the prompt's, then those from its cut on)."""
        if prompt.cut is None:
            return self._ids(prompt.text + answer_text + self.end_of_turn)
        start, token = prompt.cut
        return prompt.ids[:token] + self._ids(prompt.text[start:] + answer_text + self.end_of_turn)

    def _encode_parts(self, prompt: _Prompt, answer_text: str, where: str) -> EncodedConversation:
        prompt_ids = prompt.ids
        n = len(self.pattern.token_ids)
        if prompt_ids[-n:] != list(self.pattern.token_ids):
            raise ValueError(
                f"{where}: the rendered prompt does not end with the gating pattern {self.pattern.text!r} (the "
                "template's assistant header), so h_x cannot be located. Render it with `add_generation_prompt=True` "
                "and the reward model's chat template."
            )
        gating_position = len(prompt_ids) - n + self.pattern.offset
        # No special token's text in the answer: it has the same tokens read either way, no need to compare them.
        plain = self._plain_by_text and self._is_plain(answer_text)
        answer_ids = None if plain and not prompt.structured else self._ids(answer_text, plain=True)
        if not prompt.structured and (plain or answer_ids == self._ids(answer_text)):
            # No markup in the answer: the tokens `apply_chat_template` gives for the whole conversation.
            input_ids = self._whole_ids(prompt, answer_text)
            if input_ids[: gating_position + 1] != prompt_ids[: gating_position + 1]:
                input_ids = prompt_ids + self._ids(answer_text, plain=True) + self._ids(self.end_of_turn)
        else:
            # Markup in the answer stays plain text: it cannot close the turn or open a new one.
            input_ids = prompt_ids + answer_ids + self._ids(self.end_of_turn)
        return EncodedConversation(input_ids, gating_position, len(prompt_ids))


def collate(encoded: Sequence[EncodedConversation], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `position_ids` and the rows' `gating_positions`."""
    input_ids, attention_mask = right_pad([row.input_ids for row in encoded], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "gating_positions": torch.tensor([row.gating_position for row in encoded], dtype=torch.long),
    }


class Progress:
    """A tqdm bar over rows that also shows the real (unpadded) tokens per second."""

    def __init__(self, total: int, desc: str, unit: str = " responses", disable: bool | None = False):
        self.bar = tqdm(total=total, unit=unit, desc=desc, disable=disable)
        self.tokens, self.start = 0, time.perf_counter()

    def update(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(rows)
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tok/s", False)

    def close(self) -> None:
        self.bar.close()


def run_in_batches(
    forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    encoded: Sequence[EncodedConversation],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """`forward(batch)` over length-sorted, right-padded batches of `encoded` (`length_sorted_batches`); returns each
    output (n, ...) on the CPU in the order of `encoded`. `forward` gets the `collate` dict on `device` and returns
    per-row tensors. No `max_tokens` on a CPU: `batching.CPU_MAX_BATCH_TOKENS`."""
    max_tokens = default_max_tokens(max_tokens, device)
    outputs: dict[str, torch.Tensor] = {}
    for batch in length_sorted_batches([len(row) for row in encoded], batch_size, max_tokens):
        inputs = {key: value.to(device) for key, value in collate([encoded[i] for i in batch], pad_id).items()}
        for key, value in forward(inputs).items():
            if key not in outputs:
                outputs[key] = torch.empty((len(encoded), *value.shape[1:]), dtype=value.dtype)
            outputs[key][batch] = value.detach().cpu()
        if progress is not None:
            progress.update(len(batch), int(inputs["attention_mask"].sum()))
    return outputs


@dataclass
class ScoreOutput:
    """Per-row outputs in the caller's order, float32 on the CPU: `score` (n,), `rewards`, `gating_output` and
    `coefficients` (n, k), with `score == (coefficients * rewards).sum(-1)`."""

    score: torch.Tensor
    rewards: torch.Tensor
    gating_output: torch.Tensor
    coefficients: torch.Tensor

    def __len__(self) -> int:
        return len(self.score)


@torch.inference_mode()
def score_encoded(
    model,
    encoded: Sequence[EncodedConversation],
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_id: int = 0,
    progress=None,
    max_length: int | None = None,
    share_prefix: bool = True,
    max_batch_tokens: int | None = None,
    pack: bool | None = None,
) -> ScoreOutput:
    """Run an `ArmoRMForRewardModeling` over encoded conversations (gating positions passed, never searched).

    Batches hold up to `batch_size` conversations and `max_batch_tokens` padded tokens, rows × the longest
    (`batching`). Conversations that share their tokens up to the gating position run them once, with whatever tokens
    all of them have next (`share_prefix=False` runs each whole; the scores agree up to float rounding, see
    `prefix_sharing`). `pack`: run each batch packed in one row with no padding (`packing`); not given, packed on a
    CPU where the backbone allows it (`packs`), padded on an accelerator. `max_batch_tokens` not given: on a CPU
    `batching.CPU_MAX_PACKED_TOKENS` packed and `batching.CPU_MAX_BATCH_TOKENS` padded, on an accelerator rows only.

    A conversation longer than `max_length` tokens (or the backbone's `max_position_embeddings`) raises a
    `ValueError` naming it: a reward is never read from a cut conversation. A conversation whose score, rewards or
    gating weights come out NaN or infinite (a backbone overflow) raises `NonFiniteScoreError` naming it: a reward is
    never NaN."""
    device = next(model.parameters()).device
    pack = packs(model, pack)
    max_batch_tokens = default_max_tokens(max_batch_tokens, device, pack)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i, row in enumerate(encoded):
        if max_length is not None and len(row) > max_length:
            raise ValueError(
                f"Conversation {i} has {len(row)} tokens, more than `max_length` ({max_length}); raise `max_length` "
                "or shorten it (drop earlier turns) before scoring."
            )
        if limit is not None and len(row) > limit:
            raise ValueError(
                f"Conversation {i} has {len(row)} tokens, more than the backbone's `max_position_embeddings` "
                f"({limit}); shorten it (drop earlier turns) before scoring."
            )
    if not encoded:
        k = model.config.num_objectives
        return ScoreOutput(torch.zeros(0), torch.zeros(0, k), torch.zeros(0, k), torch.zeros(0, k))

    shared_batches, alone = _plan(
        encoded, batch_size, share_prefix and supports_prefix_sharing(model), max_batch_tokens
    )
    # `run_in_batches` runs these batches in this order: the model's error names rows of a batch, this names ours.
    batches = iter(length_sorted_batches([len(encoded[i]) for i in alone], batch_size, max_batch_tokens))

    def forward(inputs):
        rows = [alone[i] for i in next(batches)]
        try:
            output = model(**inputs)
        except NonFiniteScoreError as error:
            raise _non_finite_error([rows[i] for i in error.rows]) from None
        return {key: getattr(output, key).float() for key in OUTPUT_FIELDS}

    k = model.config.num_objectives
    outputs = {key: torch.zeros(len(encoded), *(() if key == "score" else (k,))) for key in OUTPUT_FIELDS}
    was_training = model.training
    model.eval()
    try:
        for groups in shared_batches:
            rows = [row for group in groups for row in group]
            shared_outputs = run_prefix_batch(
                model, encoded, groups, batch_size, pad_id, progress, max_batch_tokens, pack
            )
            for key, value in zip(OUTPUT_FIELDS, shared_outputs):
                outputs[key][rows] = value
        if alone and pack:
            for batch in batches:
                rows = [alone[i] for i in batch]
                for key, value in zip(OUTPUT_FIELDS, score_packed(model, [encoded[row] for row in rows])):
                    outputs[key][rows] = value.detach().float().cpu()
                if progress is not None:
                    progress.update(len(rows), sum(len(encoded[row]) for row in rows))
        elif alone:
            alone_outputs = run_in_batches(
                forward, [encoded[i] for i in alone], batch_size, pad_id, device, progress, max_batch_tokens
            )
            for key, value in alone_outputs.items():
                outputs[key][alone] = value
    finally:
        model.train(was_training)
    # Again on the outputs: the shared-prefix path composes the heads itself (`head_outputs`, no check of its own),
    # and remote code saved by an earlier version may not check either.
    finite = torch.stack([torch.isfinite(value).reshape(len(encoded), -1).all(-1) for value in outputs.values()])
    if not finite.all():
        raise _non_finite_error((~finite.all(0)).nonzero().flatten().tolist())
    return ScoreOutput(**outputs)


def packs(model, pack: bool | None = None) -> bool:
    """Whether `score_encoded(model, ..., pack=pack)` runs its batches packed: `pack` where given (refused for a
    backbone that cannot run packed exactly), else on a CPU where the backbone allows it (`packing.supports_packing`)."""
    return _packs(model, pack, supports_packing(model))


def packs_backbone(backbone, pack: bool | None = None) -> bool:
    """`packs` for a bare backbone (`conversation_features`): `packing.backbone_supports_packing`."""
    return _packs(backbone, pack, backbone_supports_packing(backbone))


def _packs(model, pack: bool | None, supported: bool) -> bool:
    if pack is None:
        return next(model.parameters()).device.type == "cpu" and supported
    if pack and not supported:
        raise ValueError(
            "`pack=True`, but this backbone cannot run packed (`modeling_armorm.packing.backbone_supports_packing`): it "
            "needs causal SDPA or eager attention over all earlier tokens and attention keyword arguments passed through."
        )
    return pack


@torch.inference_mode()
def conversation_features(
    backbone,
    encoded: Sequence[EncodedConversation],
    batch_size: int,
    pad_id: int,
    progress: Progress | None = None,
    max_batch_tokens: int | None = None,
    pack: bool | None = None,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (the last token) and h_x (the gating position) of every conversation, as an ArmoRM reads them from its
    backbone's last hidden state: (n, d) each, float32 on the CPU, in input order. Batches as `score_encoded`'s: up to
    `batch_size` rows and `max_batch_tokens` tokens; conversations that share their tokens up to the gating position
    run that prefix once (`share_prefix`, where the backbone allows it); packed on a CPU where the backbone allows it
    (`packs_backbone`), else right-padded."""
    device = next(backbone.parameters()).device
    pack = packs_backbone(backbone, pack)
    max_batch_tokens = default_max_tokens(max_batch_tokens, device, pack)
    d = backbone.config.get_text_config().hidden_size
    h, h_x = torch.empty(len(encoded), d), torch.empty(len(encoded), d)
    shared_batches, alone = _plan(
        encoded, batch_size, share_prefix and backbone_supports_prefix_sharing(backbone), max_batch_tokens
    )
    for groups in shared_batches:
        rows = [row for group in groups for row in group]
        features = prefix_features(backbone, encoded, groups, batch_size, pad_id, progress, max_batch_tokens, pack)
        h[rows], h_x[rows] = (value.float().cpu() for value in features)
    if pack:
        for batch in length_sorted_batches([len(encoded[i]) for i in alone], batch_size, max_batch_tokens):
            rows = [alone[i] for i in batch]
            h[rows], h_x[rows] = (
                value.float().cpu() for value in packed_features(backbone, [encoded[i] for i in rows])
            )
            if progress is not None:
                progress.update(len(rows), sum(len(encoded[i]) for i in rows))
    elif alone:

        def forward(inputs):
            gating_positions = inputs.pop("gating_positions")
            hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (batch, seq, d)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = last_token_positions(inputs["attention_mask"])  # (batch,)
            return {"h": hidden[rows, last].float(), "h_x": hidden[rows, gating_positions].float()}

        features = run_in_batches(
            forward, [encoded[i] for i in alone], batch_size, pad_id, device, progress, max_batch_tokens
        )
        h[alone], h_x[alone] = features["h"], features["h_x"]
    return h, h_x


def scoring_steps(
    model,
    encoded: Sequence[EncodedConversation],
    batch_size: int,
    share_prefix: bool = True,
    max_batch_tokens: int | None = None,
    pack: bool | None = None,
) -> list[list[int]]:
    """The steps `score_encoded` runs, as lists of row indices: each batch of shared prefixes (its answers), then each
    batch of conversations run whole. `score_encoded` on one step's rows, in this order, runs exactly that step again
    (the same rows batched together, so the same numbers): a process group can split the steps among its ranks."""
    device = next(model.parameters()).device
    max_batch_tokens = default_max_tokens(max_batch_tokens, device, packs(model, pack))
    shared_batches, alone = _plan(
        encoded, batch_size, share_prefix and supports_prefix_sharing(model), max_batch_tokens
    )
    steps = [[row for group in groups for row in group] for groups in shared_batches]
    return steps + [
        [alone[i] for i in batch]
        for batch in length_sorted_batches([len(encoded[i]) for i in alone], batch_size, max_batch_tokens)
    ]


def _plan(encoded, batch_size: int, share_prefix: bool, max_tokens: int | None):
    """(batches of shared prefixes, the rows run whole): answers to one prompt run it once (exact: `prefix_sharing`)
    where `share_prefix` (asked for and the model allows it)."""
    shared_batches = prefix_batches(encoded, batch_size, max_tokens) if share_prefix else []
    shared = {row for groups in shared_batches for rows in groups for row in rows}
    return shared_batches, [i for i in range(len(encoded)) if i not in shared]


def _non_finite_error(rows: list[int]) -> NonFiniteScoreError:
    return NonFiniteScoreError(
        f"Conversation(s) {sorted(rows)} got a non-finite score, reward or gating weight (NaN or Inf), which is never "
        "a reward: the backbone overflowed (in float16? load the model in bfloat16 or float32) or its weights hold "
        "non-finite values.",
        sorted(rows),
    )


def score_conversations(
    model,
    tokenizer,
    conversations: Sequence[list[Message]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress=None,
    max_length: int | None = None,
) -> ScoreOutput:
    """Score full conversations (each ending with the assistant's answer) with an ArmoRM and its tokenizer."""
    encoder = ChatEncoder(tokenizer, model_gating_pattern(model, tokenizer))
    encoded = [encoder.encode(messages, where=f"conversation {i}") for i, messages in enumerate(conversations)]
    return score_encoded(model, encoded, batch_size, pad_token_id(tokenizer), progress, max_length)


def objective_names(config) -> list[str]:
    """The objectives' names in the model's order (`config.objective_names`, else `objective_<i>`)."""
    return list(config.objective_names or [f"objective_{i}" for i in range(config.num_objectives)])


def model_gating_pattern(model, tokenizer) -> GatingPattern:
    """The model's own gating pattern (its config), checked against what the tokenizer's template gives."""
    derived = gating_pattern_from_tokenizer(tokenizer)
    config = model.config
    if config.gating_token_pattern and list(config.gating_token_pattern) != list(derived.token_ids):
        raise ValueError(
            f"The tokenizer's chat template gives the gating pattern {derived.token_ids} ({derived.text!r}) but the "
            f"model was built for {list(config.gating_token_pattern)}: use the reward model's own tokenizer."
        )
    return GatingPattern(derived.token_ids, config.gating_token_offset, derived.text)
