# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Score token ids with an offline `vllm.LLM` running an ArmoRM checkpoint, resubmitting what must be recomputed."""

from .outputs import ArmoRMOutput, ArmoRMRequestError, ErrorCode, pooling_params


__all__ = ["score_tokens"]


def score_tokens(
    llm, token_ids: list[list[int]], gating_positions: list[int | None] | None = None, use_tqdm: bool = False
) -> list[ArmoRMOutput | ArmoRMRequestError]:
    """One `ArmoRMOutput` per prompt, or the `ArmoRMRequestError` (a `ValueError` naming the prompt) of a prompt that
    cannot be scored (no gating pattern, a position outside it, searched tokens that are not one prompt and one answer).
    A prompt whose gating token came from the prefix cache after its hidden state left the plugin's store (status 3)
    is sent again without the prefix cache, so it is always scored.

    `gating_positions`: where h_x is read in each prompt (from the rendering: `ChatEncoder.encode(...)
    .gating_position`); None: the last occurrence of the checkpoint's gating pattern in the tokens, in tokens that
    the checkpoint's turn headers show are one prompt and one answer."""
    positions = list(gating_positions) if gating_positions is not None else [None] * len(token_ids)
    if len(positions) != len(token_ids):
        raise ValueError(f"Got {len(token_ids)} prompts but {len(positions)} gating positions; give one per prompt.")
    results: list = [None] * len(token_ids)
    pending = list(range(len(token_ids)))
    for skip_prefix_cache in (False, True):
        outputs = llm.classify(
            [{"prompt_token_ids": list(token_ids[i])} for i in pending],
            pooling_params=[pooling_params(positions[i], skip_prefix_cache, full_output=True) for i in pending],
            use_tqdm=use_tqdm,
        )
        retry = []
        for i, output in zip(pending, outputs):
            try:
                results[i] = ArmoRMOutput.from_vector(output.outputs.probs, where=f"prompt {i}")
            except ArmoRMRequestError as error:
                results[i] = error
                if error.code == ErrorCode.PROMPT_FEATURE_EVICTED:
                    retry.append(i)
        pending = retry
        if not pending:
            break
    return results
