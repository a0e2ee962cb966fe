# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The ArmoRM pooler: h at the last prompt token, h_x at the gating position, under chunked prefill and prefix caching.

vLLM calls a pooler once per engine step with the hidden states of the tokens scheduled in that step. A request's
prompt may be split over several steps (chunked prefill), and its first tokens may not be computed at all (prefix
caching). Per request, the pooler therefore

1. works out once where h_x is read (`Plan`): the gating position the client passed (`GATING_POSITION_KEY`, from the
   rendering) or else the first token of the last occurrence of the gating pattern, plus its offset. Searched, the
   tokens must be one prompt and one answer by the checkpoint's `turn_header_patterns`, as `ArmoRMForRewardModeling`
   requires of raw token ids (`modeling_armorm.heads.misplaced_turns`): no prompt turn after the gating pattern, no
   second assistant header after the last prompt turn (an answer that writes the header would move h_x into itself);
2. in every step, stores the hidden states of the scheduled tokens that could be gating positions
   (`PromptFeatureStore`), then takes h_x from this step's hidden states when the gating position is scheduled now,
   or from the store when vLLM served it from its prefix cache;
3. in the step that computes the last prompt token, returns the reward [s], or [status, s, r, g, c] to a request
   that asks for the full vector (see `vllm_armorm.outputs`).

It never raises for a request (an exception here would stop the engine for every request): a request it cannot score
gets [NaN] (the OpenAI server answers it with an error), or in the full vector a status code and zeros.
"""

from collections.abc import Callable, Set
from dataclasses import dataclass

import numpy as np
import torch
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.v1.pool.metadata import PoolingMetadata

from modeling_armorm.heads import answer_lengths, misplaced_turns

from .outputs import FULL_OUTPUT_KEY, GATING_POSITION_KEY, ErrorCode, output_size
from .prompt_features import PromptFeatureStore, candidate_positions, prefix_keys


__all__ = ["ArmoRMPooler", "Plan", "PoolerStats", "one_prompt_and_one_answer", "plan_request"]

# (h, h_x, answer tokens) -> (n, 1 + 3k) = [s, r, g, c] for n requests; the model's heads, in their own dtype.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Plan:
    """Where one request reads h_x, and the prompt positions it stores for others (ascending, with their keys)."""

    gating_position: int
    error: ErrorCode
    positions: np.ndarray
    keys: list[bytes]
    gating_key: bytes | None
    prompt_feature: torch.Tensor | None = None  # h_x once known, (d,)
    full_output: bool = False  # [status, s, r, g, c] instead of [s]


@dataclass
class PoolerStats:
    """Where the pooler found h_x, counted over the requests it has seen (`LLM.apply_model(lambda m: m.pooler.stats)`)."""

    computed: int = 0  # the gating token was computed in this request's own steps
    from_store: int = 0  # it was served from vLLM's prefix cache; h_x came from the prompt-feature store
    evicted: int = 0  # served from the prefix cache and gone from the store: status 3
    refused: int = 0  # no gating pattern, a gating position outside the prompt, not one prompt and one answer: 1, 2, 4


def plan_request(
    tokens: np.ndarray,
    pattern: tuple[int, ...],
    offset: int,
    given: int | None,
    turn_header_patterns: dict[str, list[int]] | None = None,
) -> Plan:
    """The gating position of one prompt (the given one, else the last pattern occurrence + offset) and the prompt
    positions whose hidden states it stores. Searched, tokens that `turn_header_patterns` show are not one prompt and
    one answer are refused (status 4); without them (a checkpoint made before), the search alone."""
    candidates = candidate_positions(tokens, pattern, offset)
    error, gating = ErrorCode.OK, -1
    if given is not None:
        if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < len(tokens):
            gating = given
        else:
            error = ErrorCode.GATING_POSITION_OUTSIDE_PROMPT
    else:
        ends = candidate_positions(tokens, pattern, len(pattern) - 1)  # where a whole occurrence ends
        if len(ends):
            start = int(ends[-1]) - (len(pattern) - 1)
            gating = start + offset
            if turn_header_patterns and not one_prompt_and_one_answer(tokens, start, turn_header_patterns, pattern):
                error = ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER
        else:
            error = ErrorCode.NO_GATING_PATTERN
    positions = np.union1d(candidates, [gating]) if error == ErrorCode.OK else candidates
    positions = positions.astype(np.int64)
    keys = prefix_keys(tokens, positions)
    gating_key = keys[int(np.searchsorted(positions, gating))] if error == ErrorCode.OK else None
    return Plan(gating, error, positions, keys, gating_key)


def one_prompt_and_one_answer(
    tokens: np.ndarray, pattern_start: int, turn_header_patterns: dict[str, list[int]], pattern: tuple[int, ...]
) -> bool:
    """Whether raw tokens whose last gating pattern starts at `pattern_start` are one prompt and one answer by the
    turn headers: the model's rule for raw token ids (`modeling_armorm.heads.misplaced_turns`)."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]  # (1, seq)
    turn_after_answer, second_answer = misplaced_turns(
        ids, torch.ones_like(ids), torch.tensor([pattern_start]), turn_header_patterns, list(pattern)
    )
    return not (turn_after_answer.item() or second_answer.item())


class ArmoRMPooler(Pooler):
    """See the module docstring. `score_fn` is the model's heads; `store` holds prompt features across requests;
    `turn_header_patterns` the checkpoint's (`ArmoRMConfig.turn_header_patterns`), None for one made before."""

    def __init__(
        self,
        score_fn: ScoreFn,
        num_objectives: int,
        pattern,
        offset: int,
        store: PromptFeatureStore,
        turn_header_patterns: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        self.score_fn = score_fn
        self.num_objectives = num_objectives
        self.pattern = tuple(int(i) for i in pattern)
        self.offset = int(offset)
        self.store = store
        self.turn_header_patterns = {
            str(role): [int(i) for i in ids] for role, ids in (turn_header_patterns or {}).items() if ids
        }
        self.stats = PoolerStats()

    def get_supported_tasks(self) -> Set[str]:
        return {"classify"}

    def get_pooling_updates(self, task) -> PoolingParamsUpdate:
        # The prompt's token ids on the CPU: the pattern search and the prefix keys read them.
        return PoolingParamsUpdate(requires_token_ids=True)

    def _plan(self, state, params, tokens: torch.Tensor) -> Plan:
        plan = getattr(state, "armorm_plan", None)
        if plan is None:
            extra = params.extra_kwargs or {}
            given = extra.get(GATING_POSITION_KEY)
            plan = plan_request(tokens.numpy(), self.pattern, self.offset, given, self.turn_header_patterns)
            plan.full_output = bool(extra.get(FULL_OUTPUT_KEY, False))
            state.armorm_plan = plan  # lives as long as the request's pooling state
            self.stats.refused += plan.error != ErrorCode.OK
        return plan

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> list[torch.Tensor | None]:
        cursor = pooling_metadata.get_pooling_cursor()
        scheduled = cursor.num_scheduled_tokens_cpu.tolist()
        ends = cursor.seq_lens_cpu.tolist()  # tokens computed once this step is done
        prompt_lens = cursor.prompt_lens_cpu.tolist()
        finished = cursor.get_finished_mask()
        rows = np.concatenate([[0], np.cumsum(scheduled)[:-1]]).tolist()  # each request's first row in hidden_states
        tokens = pooling_metadata.get_prompt_token_ids_cpu()
        plans = [
            self._plan(state, params, ids)
            for state, params, ids in zip(pooling_metadata.pooling_states, pooling_metadata.pooling_params, tokens)
        ]

        # 1. Store this step's candidate positions first: another request of this very step may read them from blocks
        #    that vLLM already counts as cached.
        keys, index = [], []
        for plan, row, end, count in zip(plans, rows, ends, scheduled):
            begin = end - count
            lo, hi = np.searchsorted(plan.positions, [begin, end])
            for j in range(lo, hi):
                keys.append(plan.keys[j])
                index.append(row + int(plan.positions[j]) - begin)
        if keys:
            self.store.put(keys, hidden_states[torch.tensor(index, device=hidden_states.device)])

        # 2. h_x: from this step's hidden states, or from the store when the gating token was not computed here.
        for plan, row, end, count in zip(plans, rows, ends, scheduled):
            if plan.error != ErrorCode.OK or plan.prompt_feature is not None or plan.gating_position >= end:
                continue
            begin = end - count
            if plan.gating_position >= begin:
                plan.prompt_feature = hidden_states[row + plan.gating_position - begin].clone()
                self.stats.computed += 1
            else:
                plan.prompt_feature = self.store.get(plan.gating_key)
                if plan.prompt_feature is None:
                    plan.error = ErrorCode.PROMPT_FEATURE_EVICTED
                    self.stats.evicted += 1
                else:
                    self.stats.from_store += 1

        # 3. Outputs of the requests whose prompt is complete; None for the others (vLLM keeps none of those).
        outputs: list[torch.Tensor | None] = [None] * len(plans)
        done = [i for i, is_done in enumerate(finished) if is_done]
        scored = [i for i in done if plans[i].error == ErrorCode.OK]
        if scored:
            device = hidden_states.device
            last = torch.tensor([rows[i] + scheduled[i] - 1 for i in scored], device=device)
            h = hidden_states[last]  # (n, d), the last prompt token (computed in the request's final step)
            h_x = torch.stack([plans[i].prompt_feature for i in scored])  # (n, d)
            # n = the answer's tokens after the gating position; the last prompt token is at prompt_len - 1
            answer = answer_lengths(
                torch.tensor([prompt_lens[i] - 1 for i in scored], device=device),
                torch.tensor([plans[i].gating_position for i in scored], device=device),
            )  # (n,)
            values = self.score_fn(h, h_x, answer)  # (n, 1 + 3k)
            status = torch.zeros(len(scored), 1, dtype=values.dtype, device=device)
            for i, vector in zip(scored, torch.cat([status, values], dim=-1)):
                outputs[i] = vector if plans[i].full_output else reward(vector[1:2])
        for i in done:
            if plans[i].error != ErrorCode.OK:
                if plans[i].full_output:
                    vector = torch.zeros(output_size(self.num_objectives), device=hidden_states.device)
                    vector[0] = float(plans[i].error)
                else:
                    vector = torch.full((1,), float("nan"), device=hidden_states.device)
                outputs[i] = vector
        return outputs


def reward(score: torch.Tensor) -> torch.Tensor:
    """The reward layout [s]: a non-finite s is NaN, which the OpenAI server refuses to write as a number."""
    return torch.where(score.isfinite(), score, torch.full_like(score, float("nan")))
