"""The ArmoRM heads applied to stored features, in chunks (the features of a large dataset do not fit twice in memory):

    r  = W h                 rewards, one per objective          `rewards(embeddings, weight)`
    r' = r T                 verbosity-decorrelated rewards      `transformed_rewards(embeddings, weight, matrix)`
    s  = g(h_x) · r'         the score of both answers of a pair `pair_scores(gating, prompt_embeddings, rewards)`

The model computes the same from a forward pass (`ArmoRMForRewardModeling.forward`); the stages work on features.
"""

import torch


__all__ = ["pair_scores", "rewards", "transformed_rewards"]

CHUNK_ROWS = 65536


def rewards(embeddings: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """r = W h for every row: embeddings (..., d) → (..., k), computed in `dtype` (the features may be bfloat16)."""
    weight = weight.to(dtype)
    chunks = [embeddings[i : i + CHUNK_ROWS].to(dtype) @ weight.T for i in range(0, len(embeddings), CHUNK_ROWS)]
    if not chunks:
        return embeddings.new_zeros((*embeddings.shape[:-1], weight.shape[0]), dtype=dtype)
    return torch.cat(chunks)


def transformed_rewards(
    embeddings: torch.Tensor, weight: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """r' = (W h) T: rows are row vectors, so T multiplies on the right. (..., d) → (..., k)."""
    return rewards(embeddings, weight, dtype) @ matrix.to(dtype)


def pair_scores(gating, prompt_embeddings: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """s = g(h_x) · r' for both answers: prompt_embeddings (B, d), rewards (B, 2, k) → scores (B, 2).

    The gating runs once per pair: both answers share the prompt, hence h_x and the weights g.
    """
    g = gating(prompt_embeddings)  # (B, k), softmax over the objectives, β included
    return (g.unsqueeze(1) * rewards).sum(-1)  # (B, 2)
