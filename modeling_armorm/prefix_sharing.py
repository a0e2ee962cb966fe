# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Shared-prefix scoring: answers to one prompt run the prompt once.

A GRPO step scores 8-64 answers to one prompt, annotation 4-16, `compare` and `rank` 2-N, and `armorm extract` reads
the features of a pair's two sides or of several rated answers to one prompt. Rows whose token ids agree up to and
including the gating position (where h_x is read) share a prefix: those tokens and any that follow them in every row of
the group (the rest of the chat template's assistant header, an opening all the answers have), short of each row's last
token. The backbone runs each distinct prefix once, keeps its key/value cache, and runs the rest of every answer on top
of a copy of it. Attention is causal, so a prefix token's hidden state never depends on what follows: h_x read from the
prefix run and h read at each answer's last token are those of the whole conversation run alone (up to float rounding
of different matmul shapes).

Grouping is found from the token ids, never taken from the caller. Prefixes are right-padded into one batch; each
answer's tokens follow its prefix's padded width, with the prefix's padding masked out and positions counted on from
its real length. `prefix_features` gives the features (h, h_x) of a bare backbone; `run_prefix_batch` the heads' outputs
of an ArmoRM on them.
"""

import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .batching import length_sorted_batches, right_pad
from .heads import answer_lengths, position_ids_from_mask
from .packing import PackedLayout, attends_causally, attends_to_all_earlier_tokens, bounds_of, pack


__all__ = [
    "backbone_supports_prefix_sharing",
    "prefix_batches",
    "prefix_features",
    "prefix_groups",
    "run_prefix_batch",
    "shared_length",
    "supports_prefix_sharing",
]


def prefix_groups(encoded: Sequence) -> list[list[int]]:
    """Indices of `encoded` rows that share their tokens up to and including the gating position, in order of first
    appearance; only groups of two or more rows, each with at least one token after the gating position."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(encoded):
        if len(row.input_ids) > row.gating_position + 1:
            groups.setdefault(tuple(row.input_ids[: row.gating_position + 1]), []).append(i)
    return [rows for rows in groups.values() if len(rows) > 1]


def shared_length(encoded: Sequence, rows: list[int]) -> int:
    """How many tokens the rows of one group of `prefix_groups` run once: all they have in common from the start, at
    least up to and including the gating position, and short of the shortest row's last token (each row runs at least
    its last token, where h is read)."""
    ids = [encoded[row].input_ids for row in rows]
    first, n = ids[0], encoded[rows[0]].gating_position + 1
    end = min(map(len, ids)) - 1
    while n < end and all(other[n] == first[n] for other in ids[1:]):
        n += 1
    return n


def supports_prefix_sharing(model) -> bool:
    """Whether `model` (an `ArmoRMForRewardModeling`) can score with a shared prefix exactly: its heads are callable on
    features (`head_outputs`, absent from remote code saved by older versions) and its backbone shares prefixes
    (`backbone_supports_prefix_sharing`)."""
    backbone = getattr(model, "model", None)
    return backbone is not None and hasattr(model, "head_outputs") and backbone_supports_prefix_sharing(backbone)


def backbone_supports_prefix_sharing(backbone) -> bool:
    """Whether `backbone` runs an answer over its prompt's cache exactly: it takes a key/value cache, attends causally
    (`packing.attends_causally`), and every layer attends to all earlier tokens (a sliding window counts positions in the
    padded cache)."""
    return (
        _cache_argument(backbone) is not None
        and attends_causally(backbone)
        and attends_to_all_earlier_tokens(backbone.config.get_text_config())
    )


def _cache_argument(backbone) -> str | None:
    # The class's own forward: a hook or wrapper on the instance (a profiler, accelerate) may hide the signature.
    return _forward_cache_argument(type(backbone))


@functools.cache
def _forward_cache_argument(backbone_class: type) -> str | None:
    # transformers renamed the backbone's `past_key_values` to `cache` (5.2x); both names are in use.
    parameters = inspect.signature(backbone_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def prefix_batches(encoded: Sequence, batch_size: int, max_tokens: int | None = None) -> list[list[list[int]]]:
    """The groups of `prefix_groups` in batches of prefixes sorted by length, longest first (`length_sorted_batches`
    of their prefixes: up to `batch_size` and `max_tokens` padded tokens)."""
    groups = prefix_groups(encoded)
    order = length_sorted_batches([shared_length(encoded, rows) for rows in groups], batch_size, max_tokens)
    return [[groups[g] for g in batch] for batch in order]


def run_prefix_batch(
    model,
    encoded: Sequence,
    groups: list[list[int]],
    batch_size: int,
    pad_id: int,
    progress=None,
    max_tokens: int | None = None,
    pack: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Score the rows of `groups` (one batch of `prefix_batches`) with each prefix run once (`prefix_features`): the
    heads' (s, r, g, c), float32 on the CPU, for the n rows of `groups` in their order there."""
    h, h_x = prefix_features(model.model, encoded, groups, batch_size, pad_id, progress, max_tokens, pack)
    rows = [encoded[row] for group in groups for row in group]
    # n: the answer's tokens after the gating position, up to its last token.
    n = answer_lengths(
        torch.tensor([len(row) - 1 for row in rows]), torch.tensor([row.gating_position for row in rows])
    )
    outputs = model.head_outputs(h, h_x, n.to(h.device))
    return tuple(value.detach().float().cpu() for value in outputs)


def prefix_features(
    backbone,
    encoded: Sequence,
    groups: list[list[int]],
    batch_size: int,
    pad_id: int,
    progress=None,
    max_tokens: int | None = None,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (each answer's last token) and h_x (its prompt's gating position), (n, d) each on the backbone's device in its
    dtype, for the n rows of `groups` (one batch of `prefix_batches`) in their order there. Each prefix runs once; the
    answers run over its key/value cache in batches of up to `batch_size` rows and `max_tokens` tokens of their own,
    right-padded or packed (`pack`, `packing.backbone_supports_packing`)."""
    if pack:
        return _packed_prefix_features(backbone, encoded, groups, batch_size, progress, max_tokens)
    device = next(backbone.parameters()).device
    cache_argument = _cache_argument(backbone)
    prefixes = [encoded[rows[0]].input_ids[: shared_length(encoded, rows)] for rows in groups]
    input_ids, prefix_mask = (tensor.to(device) for tensor in right_pad(prefixes, pad_id))
    out = backbone(
        input_ids=input_ids,
        attention_mask=prefix_mask,
        position_ids=position_ids_from_mask(prefix_mask),
        use_cache=True,
    )
    # h_x, read once per prompt, at its gating position.
    gating = torch.tensor([encoded[rows[0]].gating_position for rows in groups], device=device)  # (prefixes,)
    h_x = out.last_hidden_state[torch.arange(len(prefixes), device=device), gating]  # (prefixes, d)
    lengths = prefix_mask.sum(-1)  # (prefixes,)
    cache = [(layer.keys, layer.values) for layer in getattr(out, cache_argument).layers]
    if progress is not None:
        progress.update(0, int(lengths.sum()))

    # The answers: (row, its prefix's index), in the order of `groups`; run longest remainder first.
    answers = [(row, p) for p, rows in enumerate(groups) for row in rows]
    remainders = [len(encoded[row]) - int(lengths[p]) for row, p in answers]
    h = h_x.new_empty(len(answers), h_x.shape[-1])
    for chunk in length_sorted_batches(remainders, batch_size, max_tokens):
        index = torch.tensor([answers[i][1] for i in chunk], device=device)  # (answers,) the prefix of each
        suffixes = [encoded[row].input_ids[int(lengths[p]) :] for row, p in (answers[i] for i in chunk)]
        suffix_ids, suffix_mask = (tensor.to(device) for tensor in right_pad(suffixes, pad_id))
        # Each answer's tokens continue its prefix: positions from its real length, the prefix's padding masked.
        positions = lengths[index, None] + torch.arange(suffix_ids.shape[1], device=device)  # (answers, S)
        hidden = backbone(
            input_ids=suffix_ids,
            attention_mask=torch.cat([prefix_mask[index], suffix_mask], dim=1),
            position_ids=positions,
            use_cache=True,
            **{cache_argument: DynamicCache([(keys[index], values[index]) for keys, values in cache])},
        ).last_hidden_state  # (answers, S, d)
        last = suffix_mask.sum(-1) - 1  # (answers,) the last real token, counted in the suffix
        h[torch.tensor(chunk, device=device)] = hidden[torch.arange(len(chunk), device=device), last]
        if progress is not None:
            progress.update(len(chunk), int(suffix_mask.sum()))
    return h, h_x[torch.tensor([p for _, p in answers], device=device)]


def _packed_prefix_features(
    backbone,
    encoded: Sequence,
    groups: list[list[int]],
    batch_size: int,
    progress=None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_features` with no padding (`packing`): the prefixes run packed in one row, each layer's keys and values
    kept per prefix, and the answers packed in chunks of up to `batch_size` rows and `max_tokens` tokens, each
    attending to its own prefix's keys and values."""
    prefixes = [encoded[rows[0]].input_ids[: shared_length(encoded, rows)] for rows in groups]
    lengths = [len(prefix) for prefix in prefixes]
    prompts = PackedLayout(bounds_of(lengths), keep=True)
    hidden = pack(backbone, prefixes, prompts)
    # h_x, read once per prompt, at its gating position.
    gating = [start + encoded[rows[0]].gating_position for (start, _), rows in zip(prompts.bounds, groups)]
    h_x = hidden[torch.tensor(gating, device=hidden.device)]  # (prefixes, d)
    if progress is not None:
        progress.update(0, sum(lengths))

    answers = [(row, p) for p, rows in enumerate(groups) for row in rows]
    remainders = [len(encoded[row]) - lengths[p] for row, p in answers]
    h = h_x.new_empty(len(answers), h_x.shape[-1])
    for chunk in length_sorted_batches(remainders, batch_size, max_tokens):
        index = [answers[i][1] for i in chunk]  # the prefix of each answer
        suffixes = [encoded[answers[i][0]].input_ids[lengths[p] :] for i, p in zip(chunk, index)]
        layout = PackedLayout(bounds_of([len(s) for s in suffixes]), prompts=index, kept=prompts.kept)
        # Each answer's tokens continue its prefix: positions from the prefix's length.
        hidden = pack(backbone, suffixes, layout, first_positions=[lengths[p] for p in index])
        last = torch.tensor([end - 1 for _, end in layout.bounds], device=hidden.device)
        h[torch.tensor(chunk, device=hidden.device)] = hidden[last]
        if progress is not None:
            progress.update(len(chunk), sum(map(len, suffixes)))
    return h, h_x[torch.tensor([p for _, p in answers], device=h_x.device)]
