# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""ArmoRM: a multi-objective reward model with a prompt-conditioned mixture of objectives (arXiv 2406.12845).

    h    = f(x ⊕ y)[last real token]                     response feature, (batch, d)
    h_x  = f(x ⊕ y)[gating position]                     prompt feature, same forward pass (attention is causal)
    r    = W h                                           k objective rewards
    g    = β · softmax(MLP(h_x) / temperature)           gating weights over the gated objectives (0 elsewhere)
    s    = g · (r T)  =  (g Tᵀ) · r                      score; T removes the verbosity component

This file is copied next to every saved checkpoint (remote code), with the two it imports besides torch and
transformers: `configuration_armorm` and `heads` (the heads' math, shared with the stages and the vLLM plugin).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_armorm import ArmoRMConfig
from .heads import (
    answer_lengths,
    armorm_heads,
    last_pattern_positions,
    last_token_positions,
    misplaced_turns,
    position_ids_from_mask,
)


# Keyword arguments that TRL's trainers pass to a reward model and that have no meaning here (`labels` do: a loss).
_IGNORED_KWARGS = ("use_cache", "margin", "token_type_ids", "return_dict", "num_items_in_batch")


# The roles whose headers open a turn of the prompt (`config.turn_header_patterns`); "assistant" opens the answer.
class NonFiniteScoreError(RuntimeError):
    """A score, reward or gating weight that is NaN or infinite: a fault of the model (a backbone that overflowed, in
    float16 say, or non-finite weights), never a reward. `rows` are the rows it names (of the batch, or of the
    caller's list on the scoring path)."""

    def __init__(self, message: str, rows: list[int] = ()):
        super().__init__(message)
        self.rows = list(rows)


@dataclass
class ArmoRMRewardOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given):
        transformers' sequence-classification loss of the one logit (`problem_type="regression"`): the mean squared
        error between the score s and `labels`, mean((s - labels)²) over the batch.
    logits (`torch.FloatTensor` of shape `(batch_size, 1)`):
        The score as a one-label classification output, the form TRL reads (`.logits[:, 0]`).
    score (`torch.FloatTensor` of shape `(batch_size,)`):
        s = Σ_i g_i (r T)_i, the preference score.
    rewards (`torch.FloatTensor` of shape `(batch_size, num_objectives)`):
        r = W h, the raw reward of each objective, on the scale of its ratings (about [0, 1]).
    gating_output (`torch.FloatTensor` of shape `(batch_size, num_objectives)`):
        g = β · softmax(MLP(h_x) / temperature), β included.
    coefficients (`torch.FloatTensor` of shape `(batch_size, num_objectives)`):
        c = g Tᵀ, the weight of each raw reward in the score: `score == (coefficients * rewards).sum(-1)`.
    prompt_embedding (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        h_x, the backbone's last hidden state at the gating position.
    hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        h, the backbone's last hidden state at the last real token.
    hidden_states, attentions:
        The backbone's, when asked for with `output_hidden_states` / `output_attentions`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None
    rewards: torch.FloatTensor | None = None
    gating_output: torch.FloatTensor | None = None
    coefficients: torch.FloatTensor | None = None
    prompt_embedding: torch.FloatTensor | None = None
    hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ArmoRMGatingNetwork(nn.Module):
    """g(h_x) = β · softmax(MLP(h_x) / temperature), the softmax over the k objectives (never over a batch axis).

    With `gated_objectives`, the softmax runs over those objectives only and the others get weight exactly 0.
    """

    def __init__(
        self,
        in_features: int,
        num_objectives: int,
        hidden_dim: int,
        n_hidden: int,
        temperature: float,
        gated_objectives: list[int] | None = None,
    ):
        super().__init__()
        self.temperature = temperature
        self.gated_objectives = None if gated_objectives is None else tuple(gated_objectives)
        widths = [in_features] + [hidden_dim] * n_hidden + [num_objectives]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.logit_scale = nn.Parameter(torch.ones(1))  # β; set by `_init_weights` or loaded

    def forward(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        x = prompt_embedding  # (batch, d)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))  # (batch, hidden_dim)
        logits = self.layers[-1](x) / self.temperature  # (batch, k)
        if self.gated_objectives is not None:
            # Objectives outside the gate get a logit of −∞: softmax weight exactly 0, no gradient.
            gated = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            gated[list(self.gated_objectives)] = True
            logits = logits.masked_fill(~gated, float("-inf"))
        return self.logit_scale * torch.softmax(logits, dim=-1)  # (batch, k)


class ArmoRMPreTrainedModel(PreTrainedModel):
    config: ArmoRMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The heads are tiny: keep them in float32 so a bfloat16 backbone scores like a float32 one.
    _keep_in_fp32_modules_strict = ["regression_layer", "gating", "reward_transform_matrix"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ArmoRMForRewardModeling):
            # T = I until a decorrelation fills it; transformers 5 leaves custom tensors uninitialised otherwise.
            init.eye_(module.reward_transform_matrix)
        elif isinstance(module, ArmoRMGatingNetwork):
            init.constant_(module.logit_scale, self.config.gating_logit_scale_init)


class ArmoRMForRewardModeling(ArmoRMPreTrainedModel):
    def __init__(self, config: ArmoRMConfig):
        super().__init__(config)
        # transformers picks the loss from the class name, which does not end in "ForSequenceClassification".
        self.loss_type = "ForSequenceClassification"
        text_config = config.get_text_config()
        self.model = AutoModel.from_config(text_config)
        self.regression_layer = nn.Linear(text_config.hidden_size, config.num_objectives, bias=False)
        self.gating = ArmoRMGatingNetwork(
            text_config.hidden_size,
            config.num_objectives,
            hidden_dim=config.gating_hidden_dim,
            n_hidden=config.gating_n_hidden,
            temperature=config.gating_temperature,
            gated_objectives=config.gated_objectives,
        )
        # T is fixed after decorrelation: a persistent buffer, so no optimizer or `requires_grad` reset can train it.
        self.register_buffer("reward_transform_matrix", torch.eye(config.num_objectives), persistent=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def find_gating_positions(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.LongTensor:
        """The last occurrence of `config.gating_token_pattern` among each row's real tokens, plus the offset. With
        `config.turn_header_patterns`, a row that is not one prompt and one answer raises a `ValueError` naming it."""
        pattern = self.config.gating_token_pattern
        if not pattern:
            raise ValueError(
                "`config.gating_token_pattern` is not set, so the prompt feature cannot be located. Set it with "
                "`modeling_armorm.gating_pattern_from_tokenizer(tokenizer)` or pass `gating_positions=`."
            )
        positions = last_pattern_positions(input_ids, attention_mask, pattern)  # (batch,)
        missing = (positions < 0).nonzero().flatten().tolist()
        if missing:
            text = self.config.gating_token_pattern_text
            raise ValueError(
                f"Row(s) {missing} of the batch hold no gating pattern {list(pattern)}"
                + (f" ({text!r})" if text else "")
                + " among their real tokens, so the prompt feature cannot be located. Render the conversation with "
                "the reward model's chat template (`tokenizer.apply_chat_template(messages)`, ending with the "
                "assistant's answer), keep the prompt within the length limit, or pass `gating_positions=`."
            )
        self._check_one_prompt_one_answer(input_ids, attention_mask, positions)
        return positions + self.config.gating_token_offset

    def _check_one_prompt_one_answer(self, input_ids, attention_mask, pattern_positions) -> None:
        """Refuse raw rows that `config.turn_header_patterns` shows are not one prompt followed by one answer: a prompt
        turn (system, user, tool) after the gating pattern, or two assistant headers after the last prompt turn."""
        turn_after_answer, second_answer = misplaced_turns(
            input_ids,
            attention_mask,
            pattern_positions,
            self.config.turn_header_patterns,
            self.config.gating_token_pattern,
        )
        if not (turn_after_answer | second_answer).any():
            return
        problems = []
        if turn_after_answer.any():
            problems.append(
                f"row(s) {turn_after_answer.nonzero().flatten().tolist()} hold a system, user or tool header after "
                "the last assistant header (the conversation does not end with the assistant's answer)"
            )
        if second_answer.any():
            problems.append(
                f"row(s) {second_answer.nonzero().flatten().tolist()} hold a second assistant header after the last "
                "prompt turn (an answer that writes the template's markup, which would move h_x into itself)"
            )
        rows = (turn_after_answer | second_answer).nonzero().flatten().tolist()
        raise ValueError(
            f"Row(s) {rows} of the batch are not one prompt and one answer: {'; '.join(problems)}. Raw token ids "
            "cannot tell the template's markup from markup an answer wrote: score through "
            "`modeling_armorm.ArmoRMReward` (or the `reward-scoring` pipeline), which renders each conversation and "
            "keeps an answer's markup as text, or pass `gating_positions=`."
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gating_positions: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.FloatTensor | None = None,
        **kwargs,
    ) -> ArmoRMRewardOutput:
        r"""
        gating_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Where to read the prompt feature h_x in each row; found from `config.gating_token_pattern` when not
            given. Required with `inputs_embeds`.
        labels (`torch.FloatTensor` of shape `(batch_size,)` or `(batch_size, 1)`, *optional*):
            A target score per row. The output's `loss` is then the mean squared error between s and the labels
            (transformers' regression loss for one label); it trains W, the gating network and the backbone where
            they require gradients, never T (a buffer).
        """
        for key in _IGNORED_KWARGS:
            kwargs.pop(key, None)
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch_size, seq_len = reference.shape
        attention_mask = self._checked_mask(input_ids, attention_mask, reference)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # (batch, seq, d)

        # The last real token is the rightmost position with mask 1, whatever the padding side or pad id.
        last_positions = last_token_positions(attention_mask.to(hidden.device))  # (batch,)
        if gating_positions is None:
            if input_ids is None:
                raise ValueError("`gating_positions` is required with `inputs_embeds`: no token ids to search.")
            gating_positions = self.find_gating_positions(input_ids, attention_mask)
        gating_positions = torch.as_tensor(gating_positions, dtype=torch.long, device=hidden.device)
        self._check_gating_positions(gating_positions, last_positions)
        rows = torch.arange(batch_size, device=hidden.device)
        head_dtype = self.regression_layer.weight.dtype
        h = hidden[rows, last_positions].to(head_dtype)  # (batch, d)
        h_x = hidden[rows, gating_positions].to(head_dtype)  # (batch, d)
        score, r, gating_output, c = self.head_outputs(h, h_x, answer_lengths(last_positions, gating_positions))

        if not self.training:
            self._check_finite(score, r, gating_output)
        loss = None if labels is None else self._regression_loss(score[:, None], labels)
        return ArmoRMRewardOutput(
            loss=loss,
            logits=score[:, None],
            score=score,
            rewards=r,
            gating_output=gating_output,
            coefficients=c,
            prompt_embedding=h_x,
            hidden_state=h,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def head_outputs(
        self, h: torch.Tensor, h_x: torch.Tensor, n: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads on the backbone's features: (s, r, g, c) from h (batch, d) at each answer's last token, h_x
        (batch, d) at its gating position and n (batch,), the answer's tokens after the gating position."""
        head_dtype = self.regression_layer.weight.dtype
        # The heads run in their own (float32) dtype even under a trainer's bf16 autocast.
        with torch.autocast(device_type=h.device.type, enabled=False):
            # r = W h ; g = β softmax(MLP(h_x)/τ) ; s = g · (r T) ; c = g Tᵀ  (the math: `heads.py`)
            return armorm_heads(
                h.to(head_dtype),
                h_x.to(head_dtype),
                n,
                self.regression_layer,
                self.gating,
                self.reward_transform_matrix.to(head_dtype),
                self.config.length_objective,
            )

    @staticmethod
    def _check_finite(score: torch.Tensor, r: torch.Tensor, gating_output: torch.Tensor) -> None:
        """A reward is never NaN or infinite (TRL would `nansum` a NaN to 0 without a word): in eval mode a row with a
        non-finite score, reward or gating weight raises `NonFiniteScoreError`. A trainer (train mode) sees its NaN
        loss instead."""
        finite = torch.isfinite(score) & torch.isfinite(r).all(-1) & torch.isfinite(gating_output).all(-1)
        if not finite.all():
            rows = (~finite).nonzero().flatten().tolist()
            raise NonFiniteScoreError(
                f"Row(s) {rows} of the batch have a non-finite score, reward or gating weight (NaN or Inf): the "
                "backbone overflowed (in float16? load the model in bfloat16 or float32) or its weights hold "
                "non-finite values.",
                rows,
            )

    def _checked_mask(self, input_ids, attention_mask, reference) -> torch.Tensor:
        """The attention mask, refusing inputs that would be scored at the wrong token: no tokens, a row with no real
        token, a padded batch without a mask, or a row longer than the backbone's positions."""
        batch_size, seq_len = reference.shape
        if seq_len == 0 or batch_size == 0:
            raise ValueError("The input is empty: give at least one conversation of at least one token.")
        if attention_mask is None:
            pad = self.config.pad_token_id
            if input_ids is not None and pad is not None and batch_size > 1:
                # A row that starts with the pad id, or ends with two of them, was padded: without the mask its last
                # real token (the reward) and its positions would be read wrong.
                padded = (input_ids[:, 0] == pad) | ((input_ids[:, -1] == pad) & (input_ids[:, -2:] == pad).all(-1))
                if padded.any():
                    raise ValueError(
                        f"Row(s) {padded.nonzero().flatten().tolist()} of the batch look padded (pad id {pad}) but no "
                        "`attention_mask` was given: pass the tokenizer's `attention_mask` with padded inputs."
                    )
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=reference.device)
        lengths = attention_mask.sum(-1)
        if (lengths == 0).any():
            raise ValueError(f"Row(s) {(lengths == 0).nonzero().flatten().tolist()} have no real token (mask all 0).")
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and (lengths > limit).any():
            raise ValueError(
                f"Row(s) {(lengths > limit).nonzero().flatten().tolist()} hold more tokens than the backbone's "
                f"`max_position_embeddings` ({limit}): shorten the conversation (drop earlier turns) to fit."
            )
        return attention_mask

    def _regression_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' `ForSequenceClassification` loss of the one logit s: MSE(s, labels), averaged over the rows."""
        if labels.shape not in (logits.shape[:1], logits.shape):
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)}; give one target score per row, of shape "
                f"{tuple(logits.shape[:1])} or {tuple(logits.shape)}."
            )
        if self.config.problem_type != "regression":
            raise ValueError(
                f"`config.problem_type` is {self.config.problem_type!r}, but the model has one output, the score s, "
                'and `labels` are target scores: set `config.problem_type = "regression"` (the default).'
            )
        labels = labels.view_as(logits)  # (batch, 1)
        return self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)

    @staticmethod
    def _check_gating_positions(gating_positions: torch.Tensor, last_positions: torch.Tensor) -> None:
        if gating_positions.shape != last_positions.shape:
            raise ValueError(
                f"`gating_positions` has shape {tuple(gating_positions.shape)}; give one position per row "
                f"({tuple(last_positions.shape)})."
            )
        wrong = (gating_positions < 0) | (gating_positions > last_positions)
        if wrong.any():
            rows = wrong.nonzero().flatten().tolist()
            raise ValueError(
                f"`gating_positions` of row(s) {rows} ({gating_positions[rows].tolist()}) are outside the real tokens "
                f"(0 to {last_positions[rows].tolist()}): the prompt feature must be read inside the prompt."
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint that lacks any tensor of the model (a missing head
        tensor would otherwise be initialised, T = I or a random W, and score silently), holds tensors the model does
        not have (made for another model: they would be dropped), or holds NaN or Inf in a head tensor (W, T, β, the
        gating layers: every score would be non-finite)."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(
                f"The checkpoint lacks the tensors {missing}, so the model would score with made-up values for them. "
                "Assemble it again (`armorm assemble`) or convert it (`armorm convert-rlhflow`)."
            )
        unexpected = sorted(info.get("unexpected_keys") or [])
        if unexpected:
            raise ValueError(
                f"The checkpoint holds the tensors {unexpected}, which the model does not have: it was made for "
                "another model, and loading would drop them silently. Assemble it again (`armorm assemble`), convert "
                "it (`armorm convert-rlhflow`), or delete these tensors from its safetensors files."
            )
        prefix = f"{model.base_model_prefix}."
        non_finite = [
            name
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if not name.startswith(prefix) and not tensor.is_meta and not torch.isfinite(tensor).all()
        ]
        if non_finite:
            raise ValueError(
                f"The checkpoint's head tensors {non_finite} hold non-finite values (NaN or Inf), so every score "
                "would be non-finite. Assemble it again (`armorm assemble`) from head files written by `armorm fit`, "
                "`armorm decorrelate` and `armorm gate`."
            )
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` makes transformers write `auto_map` for the config and for one Auto class. This
        # class answers to two (AutoModel and AutoModelForSequenceClassification): both go in the map, which
        # transformers completes with the config's entry (and which drops any other checkpoint's entries).
        if self._auto_class is not None:
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            self.config.auto_map = {"AutoModel": name, "AutoModelForSequenceClassification": name}
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = [
    "ArmoRMForRewardModeling",
    "ArmoRMGatingNetwork",
    "ArmoRMPreTrainedModel",
    "ArmoRMRewardOutput",
    "NonFiniteScoreError",
]
