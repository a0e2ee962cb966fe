"""Benchmark of `armorm fit` (stage 1) against the reference approach: scikit-learn `Ridge` per α per objective.

    .venv/bin/python benchmarks/bench_fit.py                      # N = 200k, d = 1024, k = 19, three label masks
    .venv/bin/python benchmarks/bench_fit.py --reference-per-mask 0   # the reference on every objective (slow)

Synthetic rating features (a decaying spectrum in a random basis, so the penalty matters) are written as shards
with `write_features`; three datasets label 5, 9 and 5 objectives on disjoint rows, as in the ArmoRM data.
Ours: `fit_regression` end to end (read + verify the shards, Gram statistics, α selection, refit, metrics).
Reference: for an objective, `Ridge(alpha, fit_intercept=False)` fitted on its training rows for every α, the α of
least validation MSE on the same split, then a refit on all its labelled rows; the data already in memory as float64
(its load time is not counted). By default the reference runs on `--reference-per-mask` objectives of each mask and
its total is extrapolated per mask (mean time per objective x the mask's objective count), as the output says.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge
from timing import cpu_model  # benchmarks/timing.py

from armorm_io.features import write_features
from conversion.fit import ALPHAS, fit_regression, validation_mask


MASKS = (("helpsteer", 5, 0.30), ("ultrafeedback+", 9, 0.50), ("code", 5, 0.20))  # name, objectives, share of rows


def make_features(folder: Path, rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    spectrum = torch.logspace(0, -3, dim)
    x = (torch.randn(rows, dim, generator=generator) * spectrum) @ basis  # (rows, d) float32
    k = sum(count for _, count, _ in MASKS)
    truth = torch.randn(dim, k, generator=generator) @ torch.diag(torch.rand(k, generator=generator) + 0.5)
    # Objectives differ in their noise, so they choose different alphas.
    noise = torch.logspace(-2, 1, k)[torch.randperm(k, generator=generator)]
    signal = x @ (basis.T @ (truth * spectrum.sqrt()[:, None]))
    y = torch.sigmoid(signal + noise * torch.randn(rows, k, generator=generator))
    labels = torch.full_like(y, float("nan"))
    groups, row, column = [], 0, 0
    for number, (_, count, share) in enumerate(MASKS):
        stop = rows if number == len(MASKS) - 1 else row + int(share * rows)
        labels[row:stop, column : column + count] = y[row:stop, column : column + count]
        groups.append(list(range(column, column + count)))
        row, column = stop, column + count
    names = [f"{name}-{j}" for (name, count, _) in MASKS for j in range(count)]
    write_features(folder, "ratings", {"embeddings": x, "labels": labels}, objectives=names, shard_rows=25_000)
    return x, labels, groups


def reference_fit(x: np.ndarray, y: np.ndarray, held_out: np.ndarray) -> tuple[float, np.ndarray]:
    labelled = ~np.isnan(y)
    train, val = labelled & ~held_out, labelled & held_out
    mse = [
        np.mean((Ridge(alpha=a, fit_intercept=False).fit(x[train], y[train]).predict(x[val]) - y[val]) ** 2)
        for a in ALPHAS
    ]
    alpha = ALPHAS[int(np.argmin(mse))]
    return alpha, Ridge(alpha=alpha, fit_intercept=False).fit(x[labelled], y[labelled]).coef_


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument(
        "--reference-per-mask", type=int, default=1, help="objectives per mask for the reference; 0 = all"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ratings"
        start = time.perf_counter()
        x, labels, groups = make_features(folder, args.rows, args.dim, args.seed)
        print(
            f"wrote {args.rows} x {args.dim} features, k = {labels.shape[1]}, in {time.perf_counter() - start:.1f} s"
        )

        start = time.perf_counter()
        ours = fit_regression(folder, alphas=list(ALPHAS), val_fraction=0.2, seed=0)
        ours_seconds = time.perf_counter() - start
        print(f"ours: {ours_seconds:.1f} s")

        held_out = validation_mask(torch.arange(args.rows), 0.2, 0).numpy()
        x64 = x.double().numpy()
        reference_seconds, worst, same_alpha, timed = 0.0, 0.0, True, 0
        for group in groups:
            subset = group if args.reference_per_mask <= 0 else group[: args.reference_per_mask]
            rows = ~np.isnan(labels[:, group[0]].numpy())
            x_group, held_group = x64[rows], held_out[rows]  # the reference's own data preparation, not timed
            seconds = []
            for j in subset:
                start = time.perf_counter()
                alpha, weight = reference_fit(x_group, labels[rows, j].double().numpy(), held_group)
                seconds.append(time.perf_counter() - start)
                same_alpha &= alpha == ours.alpha[j].item()
                ours_weight = ours.weight[j].double().numpy()
                worst = max(worst, np.abs(ours_weight - weight).max() / np.abs(weight).max())
                print(f"reference {ours.objectives[j]}: {seconds[-1]:.1f} s, alpha {alpha:g} (ours {ours.alpha[j]:g})")
            reference_seconds += np.mean(seconds) * len(group)
            timed += len(subset)

    k = labels.shape[1]
    extrapolated = timed < k
    ratio = reference_seconds / ours_seconds
    how = f"measured on {timed} of {k} objectives, extrapolated per mask" if extrapolated else "measured on all"
    print(
        f"""
### `armorm fit` (stage 1 ridge), N = {args.rows:,}, d = {args.dim}, k = {k}, 3 label masks, {len(ALPHAS)} alphas

Machine: {torch.get_num_threads()} threads, `{cpu_model()}`; numpy {np.__version__}, torch {torch.__version__}.
Command: `.venv/bin/python benchmarks/bench_fit.py --rows {args.rows} --dim {args.dim} --reference-per-mask {args.reference_per_mask}`

| approach | time (s) |
|---|---|
| ours: streamed float64 Gram statistics, one eigendecomposition per mask, Cholesky refit (read + verify shards included) | {ours_seconds:.1f} |
| reference: scikit-learn `Ridge` per alpha per objective + refit ({how}; data already in memory) | {reference_seconds:.1f} |

Speed-up: **{ratio:.0f}x**. Max relative weight difference (max |w_ours - w_ref| / max |w_ref| per objective, over the
{timed} objectives the reference fitted): **{worst:.1e}**; chosen alphas identical: {same_alpha}.
"""
    )
    if ratio < 10 or worst > 1e-4 or not same_alpha:
        raise SystemExit("benchmark target missed: need >= 10x, <= 1e-4 and the same alphas")


if __name__ == "__main__":
    main()
