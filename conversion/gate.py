"""Train the gating network of ArmoRM on preference pairs (stage 2, SPEC §1, arXiv 2406.12845 §3.2).

    armorm gate --features PAIR_FEATURES --regression regression.safetensors --transform transform.safetensors \
        --out gating.safetensors [--steps 10000 --batch-size 1024 --lr 1e-3 --hidden-dim 1024 --n-hidden 3 ...]

The backbone, W and T are frozen, so the transformed rewards r' = (W h) T of both answers of every pair are computed
once; each step then runs only the MLP on the shared prompt feature h_x and minimises the Bradley-Terry loss
−log σ(s_chosen − s_rejected) with s = g(h_x) · r', g = β · softmax(MLP(h_x) / temperature) over the k objectives.
Writes `gating.safetensors` (the state dict of `ArmoRMGatingNetwork`, i.e. the model's `gating.*`) and
`gating.json` (validation accuracy along the way and at the end).
"""

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conversion.artifacts import load_regression, load_transform, save_gating
from conversion.features import load_pair_features
from modeling_armorm import ArmoRMGatingNetwork


logger = logging.getLogger(__name__)

__all__ = [
    "add_arguments",
    "bradley_terry_loss",
    "evaluate",
    "main",
    "pair_scores",
    "train_gating",
    "transformed_rewards",
]


def add_arguments(parser):
    parser.add_argument(
        "--features", nargs="+", help="Pairs features folder(s) of `armorm extract` (the training pairs)."
    )
    parser.add_argument("--regression", help="`regression.safetensors` of `armorm fit` (W).")
    parser.add_argument("--transform", help="`transform.safetensors` of `armorm decorrelate` (T).")
    parser.add_argument("--out", help="Path of the `gating.safetensors` to write (a `.json` report goes next to it).")
    parser.add_argument("--steps", type=int, help="Optimizer steps (default 10000).")
    parser.add_argument("--batch-size", type=int, help="Pairs per step (default 1024).")
    parser.add_argument("--lr", type=float, help="AdamW peak learning rate, decayed with a cosine (default 1e-3).")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0).")
    parser.add_argument("--hidden-dim", type=int, help="Width of the gating MLP's hidden layers (default 1024).")
    parser.add_argument("--n-hidden", type=int, help="Hidden layers of the gating MLP (default 3).")
    parser.add_argument("--temperature", type=float, help="Fixed softmax temperature of the gating (default 10).")
    parser.add_argument("--beta-init", type=float, help="Initial value of the learnable scale β (default 100).")
    parser.add_argument("--val-fraction", type=float, help="Fraction of the pairs held out for validation (0.1).")
    parser.add_argument("--eval-every", type=int, help="Steps between two validation passes (default 500).")
    parser.add_argument("--seed", type=int, help="Seed of the split, the initialisation and the batches (default 0).")
    parser.add_argument("--device", help="`cpu`, `cuda`, `cuda:1`, ... (default: cuda when available).")


def transformed_rewards(
    embeddings: torch.Tensor, weight: torch.Tensor, matrix: torch.Tensor, batch_size: int = 65536
) -> torch.Tensor:
    """r' = (W h) T for every response: embeddings (N, 2, d) → (N, 2, k), in float32 chunks."""
    weight, matrix = weight.float(), matrix.float()
    chunks = []
    for start in range(0, len(embeddings), batch_size):
        h = embeddings[start : start + batch_size].float()  # (chunk, 2, d)
        # r = W h, then r' = r T (rows are row vectors, so T multiplies on the right)
        chunks.append((h @ weight.T) @ matrix)  # (chunk, 2, k)
    return torch.cat(chunks) if chunks else embeddings.new_zeros(0, 2, weight.shape[0])


def pair_scores(gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """s = g(h_x) · r' for both answers: prompt_embeddings (B, d), rewards (B, 2, k) → scores (B, 2).

    The gating runs once per pair: both answers share the prompt, hence h_x and the weights g.
    """
    g = gating(prompt_embeddings)  # (B, k), softmax over the objectives, β included
    return (g.unsqueeze(1) * rewards).sum(-1)  # (B, 2)


def bradley_terry_loss(gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor):
    """Mean of −log σ(s_chosen − s_rejected) over the pairs (index 0 chosen, 1 rejected)."""
    scores = pair_scores(gating, prompt_embeddings, rewards)
    return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()


@torch.no_grad()
def evaluate(
    gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor, batch_size: int = 8192
) -> dict[str, float]:
    """Pairwise accuracy (a tie counts as wrong) and Bradley-Terry loss over every pair."""
    correct, loss = 0, 0.0
    for start in range(0, len(rewards), batch_size):
        scores = pair_scores(
            gating, prompt_embeddings[start : start + batch_size], rewards[start : start + batch_size]
        )
        margin = scores[:, 0] - scores[:, 1]
        correct += int((margin > 0).sum())
        loss += float(-F.logsigmoid(margin).sum())
    n = len(rewards)
    return {"accuracy": correct / n, "loss": loss / n} if n else {"accuracy": float("nan"), "loss": float("nan")}


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    order = torch.randperm(n, generator=generator)
    n_val = int(n * val_fraction)
    if n - n_val < 1:
        raise ValueError(f"{n} pairs leave nothing to train on with `val_fraction` = {val_fraction}.")
    return order[n_val:], order[:n_val]


def train_gating(
    prompt_embeddings: torch.Tensor,
    rewards: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    hidden_dim: int,
    n_hidden: int,
    temperature: float,
    beta_init: float,
    val_fraction: float,
    eval_every: int,
    seed: int,
    device: str | torch.device,
) -> tuple[ArmoRMGatingNetwork, dict]:
    """Fit g on pairs: prompt_embeddings (N, d) = h_x, rewards (N, 2, k) = r' (0 chosen, 1 rejected).

    The hyper-parameters have their defaults in `main`, the one home the CLI and the tests share. Returns the
    trained network (on CPU) and a report with the validation history and the final accuracies.
    """
    n, d = prompt_embeddings.shape
    if rewards.ndim != 3 or rewards.shape[:2] != (n, 2):
        raise ValueError(f"`rewards` must be (N, 2, k) with N = {n} pairs, got shape {tuple(rewards.shape)}.")
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(
            f"`steps`, `batch_size` and `eval_every` must be >= 1, got {steps}, {batch_size}, {eval_every}."
        )
    k = rewards.shape[-1]
    device = torch.device(device)
    # One seed fixes the split, the initialisation and the batches; the generators stay on CPU so a seed gives the
    # same split and batches on every device.
    generator = torch.Generator().manual_seed(seed)
    train_rows, val_rows = _split(n, val_fraction, generator)
    torch.manual_seed(seed)
    gating = ArmoRMGatingNetwork(d, k, hidden_dim=hidden_dim, n_hidden=n_hidden, temperature=temperature)
    with torch.no_grad():
        gating.logit_scale.fill_(beta_init)  # β, learnable
    gating.to(device)

    x_train = prompt_embeddings[train_rows].float().to(device)  # (n_train, d)
    r_train = rewards[train_rows].float().to(device)  # (n_train, 2, k)
    x_val = prompt_embeddings[val_rows].float().to(device)
    r_val = rewards[val_rows].float().to(device)

    optimizer = torch.optim.AdamW(gating.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batch = min(batch_size, len(train_rows))
    history, running, seen = [], 0.0, 0
    progress = tqdm(range(1, steps + 1), desc="gate", dynamic_ncols=True)
    for step in progress:
        gating.train()
        rows = torch.randint(len(train_rows), (batch,), generator=generator).to(device)
        loss = bradley_terry_loss(gating, x_train[rows], r_train[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running, seen = running + loss.detach(), seen + 1  # a tensor: no device sync per step
        if step % eval_every == 0 or step == steps:
            gating.eval()
            entry = {"step": step, "train_loss": float(running) / seen, "lr": optimizer.param_groups[0]["lr"]}
            if len(val_rows):
                val = evaluate(gating, x_val, r_val)
                entry.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
            entry["beta"] = float(gating.logit_scale.detach())
            history.append(entry)
            progress.set_postfix({key: round(value, 4) for key, value in entry.items() if key != "step"})
            logger.info("gate step %d: %s", step, entry)
            running, seen = 0.0, 0

    gating.eval()
    final = {f"train_{key}": value for key, value in evaluate(gating, x_train, r_train).items()}
    if len(val_rows):
        final.update({f"val_{key}": value for key, value in evaluate(gating, x_val, r_val).items()})
    final["beta"] = float(gating.logit_scale.detach())
    report = {
        "pairs": n,
        "train_pairs": len(train_rows),
        "val_pairs": len(val_rows),
        "history": history,
        "final": final,
    }
    return gating.cpu(), report


def _check_objectives(regression_objectives: list[str], transform_metadata: dict, regression: str, transform: str):
    names = transform_metadata.get("objectives")
    if names is not None and list(names) != list(regression_objectives):
        raise ValueError(
            f"The objectives of {transform} ({names}) differ from those of {regression} ({regression_objectives}); "
            "re-run `armorm decorrelate` with this regression."
        )


def main(
    features: str | list[str],
    regression: str,
    transform: str,
    out: str,
    steps: int = 10_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    hidden_dim: int = 1024,
    n_hidden: int = 3,
    temperature: float = 10.0,
    beta_init: float = 100.0,
    val_fraction: float = 0.1,
    eval_every: int = 500,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    # load
    weight, _, objectives = load_regression(regression)
    matrix, _, transform_metadata = load_transform(transform)
    _check_objectives(objectives, transform_metadata, regression, transform)
    if matrix.shape != (weight.shape[0],) * 2:
        raise ValueError(
            f"T of {transform} is {tuple(matrix.shape)} but W of {regression} has {weight.shape[0]} rows."
        )
    tensors, metas = load_pair_features(features)
    meta = metas[0]
    if meta.get("kind", "pairs") != "pairs" or "prompt_embeddings" not in tensors:
        raise ValueError(
            f"{features} holds {meta.get('kind')} features; `armorm gate` needs pairs features (`embeddings` (N, 2, d) "
            "and `prompt_embeddings` (N, d)): run `armorm extract` on preference pairs."
        )
    if tensors["embeddings"].shape[-1] != weight.shape[1]:
        raise ValueError(
            f"The features of {features} have hidden size {tensors['embeddings'].shape[-1]} but W expects "
            f"{weight.shape[1]}: extract them with the backbone the regression was fitted on."
        )
    # compute
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards = transformed_rewards(tensors["embeddings"], weight, matrix)  # (N, 2, k), frozen: computed once
    hyper_parameters = dict(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        hidden_dim=hidden_dim,
        n_hidden=n_hidden,
        temperature=temperature,
        beta_init=beta_init,
        val_fraction=val_fraction,
        eval_every=eval_every,
        seed=seed,
    )
    gating, report = train_gating(tensors["prompt_embeddings"], rewards, device=device, **hyper_parameters)
    # A column of T that is all zero (the verbosity objective after decorrelation) gives r'_j = 0 for every answer:
    # weight the gating puts there switches the score off. Most of it there means the other objectives' rewards do
    # not separate the pairs, and the score is near a tie everywhere: say so. (Some weight there is normal: it is
    # also how the gating scales the score down.)
    with torch.no_grad():
        shares = (gating(tensors["prompt_embeddings"].float()) / gating.logit_scale).mean(0)  # (k,)
    null = (matrix == 0).all(0)
    off = float(shares[null].sum())
    warnings = []
    if off > 0.9:
        names = [objectives[j] for j in null.nonzero().flatten().tolist()]
        warnings.append(
            f"The gating puts {off:.0%} of its weight on {names}, whose decorrelated reward r' is 0 by construction: "
            "the score is nearly switched off. The other objectives' rewards barely separate these pairs; check "
            "the stage-1 metrics and the features, or decorrelate less (`--threshold`)."
        )
        logger.warning(warnings[-1])
    # save
    report = {
        "warnings": warnings,
        "mean_gating_share": dict(zip(objectives, shares.tolist())),
        "features": [os.path.abspath(f) for f in ([features] if isinstance(features, str) else features)],
        "regression": os.path.abspath(regression),
        "transform": os.path.abspath(transform),
        "objectives": objectives,
        "hyper_parameters": hyper_parameters,
        **report,
    }
    final = report["final"]
    extra = {
        key: value for key, value in hyper_parameters.items() if key not in ("temperature", "hidden_dim", "n_hidden")
    }
    extra.update(objectives=objectives, val_accuracy=final.get("val_accuracy"), train_accuracy=final["train_accuracy"])
    save_gating(out, gating.state_dict(), temperature, hidden_dim, n_hidden, extra_metadata=extra)
    Path(out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if final.get("val_accuracy") is not None and not math.isnan(final["val_accuracy"]):
        logger.info(
            "Validation accuracy %.4f over %d pairs; wrote %s", final["val_accuracy"], report["val_pairs"], out
        )
    return report
