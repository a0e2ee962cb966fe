# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Shared-prefix scoring: answers to one prompt run the prompt once.

A GRPO step scores 8-64 answers to one prompt, annotation 4-16, `compare` and `rank` 2-N. Rows whose token ids agree
up to and including the gating position (where h_x is read) share that prefix. The backbone runs each distinct prefix
once, keeps its key/value cache, and runs the rest of every answer on top of a copy of it. Attention is causal, so a
prefix token's hidden state never depends on what follows: h_x read from the prefix run and h read at each answer's
last token are those of the whole conversation run alone (up to float rounding of different matmul shapes).

Grouping is found from the token ids, never taken from the caller. Prefixes are right-padded into one batch; each
answer's tokens follow its prefix's padded width, with the prefix's padding masked out and positions counted on from
its real length.
"""

import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .batching import length_sorted_batches, right_pad
from .heads import answer_lengths, position_ids_from_mask
from .packing import PackedLayout, attends_to_all_earlier_tokens, bounds_of, pack


__all__ = ["prefix_batches", "prefix_groups", "run_prefix_batch", "supports_prefix_sharing"]


def prefix_groups(encoded: Sequence) -> list[list[int]]:
    """Indices of `encoded` rows that share their tokens up to and including the gating position, in order of first
    appearance; only groups of two or more rows, each with at least one token after the gating position."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(encoded):
        if len(row.input_ids) > row.gating_position + 1:
            groups.setdefault(tuple(row.input_ids[: row.gating_position + 1]), []).append(i)
    return [rows for rows in groups.values() if len(rows) > 1]


def supports_prefix_sharing(model) -> bool:
    """Whether `model` (an `ArmoRMForRewardModeling`) can score with a shared prefix exactly: its heads are callable on
    features (`head_outputs`, absent from remote code saved by older versions), its backbone takes a key/value cache,
    and every layer attends to all earlier tokens (a sliding window counts positions in the padded cache)."""
    backbone = getattr(model, "model", None)
    if not hasattr(model, "head_outputs") or backbone is None:
        return False
    if _cache_argument(backbone) is None:
        return False
    return attends_to_all_earlier_tokens(model.config.get_text_config())


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
    order = length_sorted_batches([encoded[rows[0]].gating_position + 1 for rows in groups], batch_size, max_tokens)
    return [[groups[g] for g in batch] for batch in order]


def run_prefix_batch(
    model,
    encoded: Sequence,
    groups: list[list[int]],
    batch_size: int,
    pad_id: int,
    device,
    progress=None,
    max_tokens: int | None = None,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """Score the rows of `groups` (one batch of `prefix_batches`) with each prefix run once, its answers in batches of
    up to `batch_size` rows and `max_tokens` padded tokens of their own, right-padded or packed (`pack`,
    `packing.supports_packing`). Returns `score` (n,), `rewards`, `gating_output` and `coefficients` (n, k) in float32
    on the CPU, for the n rows of `groups` in their order there."""
    if pack:
        return _run_packed_prefix_batch(model, encoded, groups, batch_size, progress, max_tokens)
    cache_argument = _cache_argument(model.model)
    prefixes = [encoded[rows[0]].input_ids[: encoded[rows[0]].gating_position + 1] for rows in groups]
    input_ids, prefix_mask = (tensor.to(device) for tensor in right_pad(prefixes, pad_id))
    out = model.model(
        input_ids=input_ids,
        attention_mask=prefix_mask,
        position_ids=position_ids_from_mask(prefix_mask),
        use_cache=True,
    )
    # h_x, read once per prompt: the prefix's last token is its gating position.
    lengths = prefix_mask.sum(-1)  # (prefixes,)
    h_x = out.last_hidden_state[torch.arange(len(prefixes), device=device), lengths - 1]  # (prefixes, d)
    cache = [(layer.keys, layer.values) for layer in getattr(out, cache_argument).layers]
    if progress is not None:
        progress.update(0, int(lengths.sum()))

    # The answers: (row, its prefix's index), in the order of `groups`; run longest remainder first.
    answers = [(row, p) for p, rows in enumerate(groups) for row in rows]
    remainders = [len(encoded[row]) - int(lengths[p]) for row, p in answers]
    outputs = _empty_outputs(len(answers), model.config.num_objectives)
    for chunk in length_sorted_batches(remainders, batch_size, max_tokens):
        index = torch.tensor([answers[i][1] for i in chunk], device=device)  # (answers,) the prefix of each
        suffixes = [encoded[row].input_ids[int(lengths[p]) :] for row, p in (answers[i] for i in chunk)]
        suffix_ids, suffix_mask = (tensor.to(device) for tensor in right_pad(suffixes, pad_id))
        # Each answer's tokens continue its prefix: positions from its real length, the prefix's padding masked.
        positions = lengths[index, None] + torch.arange(suffix_ids.shape[1], device=device)  # (answers, S)
        hidden = model.model(
            input_ids=suffix_ids,
            attention_mask=torch.cat([prefix_mask[index], suffix_mask], dim=1),
            position_ids=positions,
            use_cache=True,
            **{cache_argument: DynamicCache([(keys[index], values[index]) for keys, values in cache])},
        ).last_hidden_state  # (answers, S, d)
        last = suffix_mask.sum(-1) - 1  # (answers,) the last real token, counted in the suffix
        h = hidden[torch.arange(len(chunk), device=device), last]
        # n: the answer's tokens after the gating position, the prefix's last token.
        n = answer_lengths(lengths[index] + last, lengths[index] - 1)
        for key, value in zip(outputs, model.head_outputs(h, h_x[index], n)):
            outputs[key][chunk] = value.detach().float().cpu()
        if progress is not None:
            progress.update(len(chunk), int(suffix_mask.sum()))
    return outputs


def _run_packed_prefix_batch(
    model,
    encoded: Sequence,
    groups: list[list[int]],
    batch_size: int,
    progress=None,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """`run_prefix_batch` with no padding (`packing`): the prefixes run packed in one row, each layer's keys and values
    kept per prefix, and the answers packed in chunks of up to `batch_size` rows and `max_tokens` tokens, each
    attending to its own prefix's keys and values."""
    prefixes = [encoded[rows[0]].input_ids[: encoded[rows[0]].gating_position + 1] for rows in groups]
    lengths = [len(prefix) for prefix in prefixes]
    prompts = PackedLayout(bounds_of(lengths), keep=True)
    hidden = pack(model.model, prefixes, prompts)
    # h_x, read once per prompt: the prefix's last token is its gating position.
    h_x = hidden[torch.tensor([end - 1 for _, end in prompts.bounds], device=hidden.device)]  # (prefixes, d)
    if progress is not None:
        progress.update(0, sum(lengths))

    answers = [(row, p) for p, rows in enumerate(groups) for row in rows]
    remainders = [len(encoded[row]) - lengths[p] for row, p in answers]
    outputs = _empty_outputs(len(answers), model.config.num_objectives)
    for chunk in length_sorted_batches(remainders, batch_size, max_tokens):
        index = [answers[i][1] for i in chunk]  # the prefix of each answer
        suffixes = [encoded[answers[i][0]].input_ids[lengths[p] :] for i, p in zip(chunk, index)]
        layout = PackedLayout(bounds_of([len(s) for s in suffixes]), prompts=index, kept=prompts.kept)
        # Each answer's tokens continue its prefix: positions from the prefix's length.
        hidden = pack(model.model, suffixes, layout, first_positions=[lengths[p] for p in index])
        h = hidden[torch.tensor([end - 1 for _, end in layout.bounds], device=hidden.device)]
        prefix_lengths = torch.tensor([lengths[p] for p in index], device=hidden.device)
        # n: the answer's tokens after the gating position, the prefix's last token.
        n = answer_lengths(
            prefix_lengths + torch.tensor([len(s) - 1 for s in suffixes], device=hidden.device), prefix_lengths - 1
        )
        for key, value in zip(outputs, model.head_outputs(h, h_x[index], n)):
            outputs[key][chunk] = value.detach().float().cpu()
        if progress is not None:
            progress.update(len(chunk), sum(map(len, suffixes)))
    return outputs


def _empty_outputs(n: int, k: int) -> dict[str, torch.Tensor]:
    """`score` (n,), `rewards`, `gating_output` and `coefficients` (n, k), zeros to fill."""
    return {
        "score": torch.zeros(n),
        "rewards": torch.zeros(n, k),
        "gating_output": torch.zeros(n, k),
        "coefficients": torch.zeros(n, k),
    }
