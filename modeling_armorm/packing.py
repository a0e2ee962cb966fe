# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Packed batches: a batch's sequences end to end in one row, no padding, attention per sequence.

On a CPU a forward costs every token it computes, padding included, and a matrix product of fewer rows costs more per
row (BENCHMARKS.md). Packed, the linear layers see only real tokens, in one long product; positions restart at 0 for
each sequence; and attention runs sequence by sequence (`packed_sdpa`, registered in transformers'
`AttentionInterface`), causal within each, so no token sees another sequence and every hidden state is the one the
sequence gets run alone.

Answers over their prompt's cache (`prefix_sharing`) pack too: the prompts run packed once with each layer's keys and
values kept per prompt, then the answers run packed, each attending to all of its prompt's keys and causally to its
own tokens.

The backbone's attention implementation is switched to `packed_sdpa` for the length of a packed forward
(`packed_attention`). An ordinary forward of the same model in another thread meanwhile still gets plain SDPA with its
usual mask: `packed_sdpa` runs packed only when a forward passes a `PackedLayout`.
"""

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .heads import answer_lengths


__all__ = [
    "PACKED_ATTENTION",
    "PackedLayout",
    "attends_causally",
    "attends_to_all_earlier_tokens",
    "backbone_supports_packing",
    "bounds_of",
    "pack",
    "packed_features",
    "packed_attention",
    "packed_sdpa",
    "score_packed",
    "supports_packing",
]

PACKED_ATTENTION = "armorm_packed_sdpa"
# A 4D mask is passed to the backbone as is (transformers builds none): a packed forward's attention needs no mask.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


@dataclass
class PackedLayout:
    """Where the sequences of a packed row lie, and what they attend to beyond themselves.

    `bounds`: (start, end) of each sequence in the row. `keep`: keep each layer's keys and values of each sequence in
    `kept` (a prompt pass). `prompts`: for an answer pass, the index in `kept` of the prompt each sequence continues.
    """

    bounds: list[tuple[int, int]]
    keep: bool = False
    prompts: list[int] | None = None
    kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: query (1, heads, N, d) and key, value (1, kv_heads, N, d) of a packed row
    attend sequence by sequence; without an `armorm_packing` layout, plain SDPA."""
    layout: PackedLayout | None = kwargs.pop("armorm_packing", None)
    if layout is None:
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    for name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"Packed attention does not apply `{name}`: score this backbone unpacked.")
    layer, outputs = module.layer_idx, []
    for i, (start, end) in enumerate(layout.bounds):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if layout.keep:
            layout.kept.setdefault(layer, []).append((k, v))
        if layout.prompts is None:
            out = scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            prompt_keys, prompt_values = layout.kept[layer][layout.prompts[i]]
            k, v = torch.cat([prompt_keys, k], dim=2), torch.cat([prompt_values, v], dim=2)
            # Every prompt token, and the answer's own tokens up to the query: causal, aligned to the last key.
            mask = torch.ones(end - start, k.shape[2], dtype=torch.bool, device=q.device).tril(
                k.shape[2] - (end - start)
            )
            out = scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
            )
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, heads, d)


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
# An ordinary forward made while the switch is on gets SDPA's usual mask.
AttentionMaskInterface.register(PACKED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

_SWITCH_LOCK = threading.Lock()
# id(config) -> [the implementation to restore, forwards under the switch]
_SWITCHED: dict[int, list] = {}


@contextmanager
def packed_attention(backbone):
    """The backbone's attention implementation is `packed_sdpa` inside the block (counted, so packed forwards in
    several threads overlap safely), and back to what it was after the last one."""
    config = backbone.config
    with _SWITCH_LOCK:
        entry = _SWITCHED.setdefault(id(config), [config._attn_implementation, 0])
        if entry[1] == 0:
            config._attn_implementation = PACKED_ATTENTION
        entry[1] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                config._attn_implementation = entry[0]
                del _SWITCHED[id(config)]


def attends_to_all_earlier_tokens(config) -> bool:
    """Every layer of the backbone of `config` (its text config) attends to all earlier tokens: no sliding window."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return layer_types == {"full_attention"} and getattr(config, "sliding_window", None) is None


# backbone -> whether it attends causally (`attends_causally`), read once per backbone.
_CAUSAL: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def attends_causally(backbone) -> bool:
    """Every attention of `backbone` is causal (a token never sees a later one), as transformers' attention functions
    read it (`module.is_causal`, causal where unset): a bidirectional encoder (BERT) is not. Only then is a
    prompt's hidden state the same whatever follows it, and a packed or shared forward the conversation run alone."""
    causal = _CAUSAL.get(backbone)
    if causal is None:  # read once per backbone: walking an 8B model's modules takes about a millisecond
        causal = _CAUSAL[backbone] = all(m.is_causal for m in backbone.modules() if hasattr(m, "is_causal"))
    return causal


def supports_packing(model) -> bool:
    """Whether `model` (an `ArmoRMForRewardModeling`) scores packed exactly: its heads are callable on features
    (`head_outputs`, absent from remote code saved by older versions) and its backbone packs
    (`backbone_supports_packing`)."""
    backbone = getattr(model, "model", None)
    return backbone is not None and hasattr(model, "head_outputs") and backbone_supports_packing(backbone)


def backbone_supports_packing(backbone) -> bool:
    """Whether `backbone` computes what `packed_sdpa` does: it passes attention keyword arguments through to its
    attention function (`_supports_attention_backend`), attends with plain SDPA or eager attention, causally, every
    layer over all earlier tokens, with no logit soft-capping."""
    config = backbone.config
    return (
        getattr(backbone, "_supports_attention_backend", False)
        and config._attn_implementation in ("sdpa", "eager", PACKED_ATTENTION)
        and attends_causally(backbone)
        and attends_to_all_earlier_tokens(config)
        and getattr(config, "attn_logit_softcapping", None) is None
    )


def pack(backbone, sequences: list[list[int]], layout: PackedLayout, first_positions=None) -> torch.Tensor:
    """The backbone's last hidden state (N, d) of `sequences` packed in one row, laid out as `layout.bounds`.
    Positions count from 0 in each sequence, or from `first_positions[i]` (an answer after its prompt's tokens)."""
    device = next(backbone.parameters()).device
    input_ids = torch.tensor([[token for sequence in sequences for token in sequence]], device=device)
    starts = first_positions if first_positions is not None else [0] * len(sequences)
    positions = torch.cat([torch.arange(len(s)) + start for s, start in zip(sequences, starts)])
    with packed_attention(backbone):
        return backbone(
            input_ids=input_ids,
            attention_mask=_NO_MASK.to(device),
            position_ids=positions[None].to(device),
            use_cache=False,
            armorm_packing=layout,
        ).last_hidden_state[0]


def bounds_of(lengths: list[int]) -> list[tuple[int, int]]:
    """(start, end) of sequences of `lengths` placed end to end."""
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [(end - length, end) for length, end in zip(lengths, ends)]


def packed_features(backbone, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """h at the last token and h_x at the gating position (rows, d) of whole conversations `rows`
    (`scoring.EncodedConversation`) run packed in one row, in the backbone's dtype and on its device."""
    layout = PackedLayout(bounds_of([len(row) for row in rows]))
    hidden = pack(backbone, [row.input_ids for row in rows], layout)  # (N, d)
    starts = torch.tensor([start for start, _ in layout.bounds])
    last = starts + torch.tensor([len(row) - 1 for row in rows])
    gating = starts + torch.tensor([row.gating_position for row in rows])
    return hidden[last.to(hidden.device)], hidden[gating.to(hidden.device)]


def score_packed(model, rows) -> tuple[torch.Tensor, ...]:
    """The heads' (s, r, g, c) of whole conversations `rows` (`scoring.EncodedConversation`) run packed in one row:
    h at each one's last token, h_x at its gating position."""
    h, h_x = packed_features(model.model, rows)
    n = answer_lengths(
        torch.tensor([len(row) - 1 for row in rows]), torch.tensor([row.gating_position for row in rows])
    )
    return model.head_outputs(h, h_x, n.to(h.device))
