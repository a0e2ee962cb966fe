"""The ArmoRM heads applied to stored features, in chunks (the features of a large dataset do not fit twice in memory):

    r  = W h                 rewards, one per objective          `rewards(embeddings, weight)`
    r' = r T                 verbosity-decorrelated rewards      `transformed_rewards(embeddings, weight, matrix)`
    s  = g(h_x) · r'         the score of both answers of a pair `pair_scores(gating, prompt_embeddings, rewards)`

With `answer_lengths` the rewards gain a last column, the length objective r_len = log(1 + n) (n = the answer's tokens
after the gating position), which the model computes in its forward (`ArmoRMConfig.length_objective`).

The model computes the same from a forward pass (`ArmoRMForRewardModeling.forward`); the stages work on features.
"""

import torch


__all__ = ["LENGTH_OBJECTIVE", "length_reward", "pair_scores", "rewards", "transformed_rewards"]

CHUNK_ROWS = 65536
# The name of the length objective, the verbosity stand-in of `armorm decorrelate --verbosity length`.
LENGTH_OBJECTIVE = "answer-length"


def length_reward(answer_lengths: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """r_len = log(1 + n): the answer's length in tokens, on a scale where doubling a long answer adds a constant."""
    return torch.log1p(answer_lengths.to(dtype))


def rewards(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    answer_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """r = W h for every row: embeddings (..., d) → (..., k), computed in `dtype` (the features may be bfloat16);
    with `answer_lengths` (...,) → (..., k + 1), the length objective last."""
    weight = weight.to(dtype)
    chunks = [embeddings[i : i + CHUNK_ROWS].to(dtype) @ weight.T for i in range(0, len(embeddings), CHUNK_ROWS)]
    if not chunks:
        r = embeddings.new_zeros((*embeddings.shape[:-1], weight.shape[0]), dtype=dtype)
    else:
        r = torch.cat(chunks)
    if answer_lengths is None:
        return r
    if answer_lengths.shape != r.shape[:-1]:
        raise ValueError(
            f"`answer_lengths` has shape {tuple(answer_lengths.shape)}, the rewards {tuple(r.shape[:-1])}."
        )
    return torch.cat([r, length_reward(answer_lengths, dtype)[..., None]], dim=-1)


def transformed_rewards(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    matrix: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    answer_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """r' = (W h) T: rows are row vectors, so T multiplies on the right. (..., d) → (..., k)."""
    return rewards(embeddings, weight, dtype, answer_lengths) @ matrix.to(dtype)


def pair_scores(gating, prompt_embeddings: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """s = g(h_x) · r' for both answers: prompt_embeddings (B, d), rewards (B, 2, k) → scores (B, 2).

    The gating runs once per pair: both answers share the prompt, hence h_x and the weights g.
    """
    g = gating(prompt_embeddings)  # (B, k), softmax over the objectives, β included
    return (g.unsqueeze(1) * rewards).sum(-1)  # (B, 2)
