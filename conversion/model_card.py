"""The Hub model card of an assembled ArmoRM checkpoint: metadata, objective table, evaluation, usage, provenance.

Made with huggingface_hub's `ModelCard` / `ModelCardData`, so the YAML header is the one the Hub validates.
"""

import json
import math
from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_armorm.heads import PREFERENCE_OBJECTIVE, SCORE_QUANTILES


__all__ = [
    "METRIC_LABELS",
    "CardInfo",
    "build_model_card",
    "build_section",
    "eval_results_metadata",
    "evaluation_dataset",
    "evaluation_section",
    "objective_table",
    "remote_code_snippet",
    "score_scale_section",
    "usage_snippet",
]

PAPER = "https://arxiv.org/abs/2406.12845"
TAGS = ["reward-model", "armorm", "multi-objective", "mixture-of-experts", "rlhf", "trl"]
# Column titles of the metrics that `armorm fit` and `armorm decorrelate` report; other names are shown as they are.
METRIC_LABELS = {
    "rows": "rated rows",
    "val_mse": "val MSE",
    "pearson": "val Pearson",
    "spearman": "val Spearman",
    "pairwise_accuracy": "out-of-fold pair accuracy",
    "spearman_before": "ρ(r_i, r_v) before T",
    "spearman_after": "ρ(r'_i, r_v) after T",
}


@dataclass
class CardInfo:
    """What the card says about one checkpoint; every field comes from the assembled heads or the command line."""

    objectives: list[str]
    alphas: list[float | None]
    penalties: list[float]
    verbosity_objective: int | None
    hidden_size: int
    gating_hidden_dim: int
    gating_n_hidden: int
    gating_temperature: float
    logit_scale: float
    gating_pattern_text: str | None
    model_id: str
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    # objective -> {metric name: value}, from the reports of `armorm fit` / `armorm decorrelate`.
    objective_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # metric name -> value: the gating network's own validation numbers (`armorm gate`).
    gating_metrics: dict[str, float] = field(default_factory=dict)
    # the results of `armorm evaluate` (or RewardBench's own results, read into that shape): the card's evaluation
    # tables and its `model-index` metadata.
    eval_results: dict | None = None
    # every stage of the build in order: {"stage", "command", "settings"}, local paths reduced to file names.
    build: list[dict] = field(default_factory=list)
    # the scores on the build's reference answers (`ArmoRMConfig.score_statistics`); None: not recorded.
    score_statistics: dict[str, float] | None = None


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def objective_table(info: CardInfo) -> str:
    """One row per objective: its index, name, verbosity penalty λ_i, ridge α_i and validation metrics."""
    metric_names = list(dict.fromkeys(name for metrics in info.objective_metrics.values() for name in metrics))
    header = ["#", "objective", "verbosity penalty λ", "ridge α", *(METRIC_LABELS.get(m, m) for m in metric_names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, name in enumerate(info.objectives):
        if i == info.verbosity_objective:
            # r'_v = 0: the verbosity reward is removed from the score, it has no penalty of its own.
            penalty = "— (verbosity, r'_v = 0)"
        else:
            penalty = _number(info.penalties[i])
        metrics = info.objective_metrics.get(name, {})
        cells = [str(i), f"`{name}`", penalty, _number(info.alphas[i], 2)]
        cells += [
            str(int(metrics[m])) if m == "rows" and m in metrics else _number(metrics.get(m)) for m in metric_names
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The benchmarks whose scores `armorm evaluate` computes: results key → (Hub dataset id, name, what the numbers are).
BENCHMARKS = {
    "rewardbench": ("allenai/reward-bench", "RewardBench", "sections"),
    "rewardbench2": ("allenai/reward-bench-2", "RewardBench 2", "subsets"),
}


def evaluation_dataset(results: dict) -> tuple[str, str]:
    """(Hub dataset id, name) of what was evaluated: RewardBench (v1 or 2) when its subsets were scored, else the data
    as `armorm evaluate` recorded it (a local file by its name only, so no local path leaves the machine)."""
    for key, (dataset_id, name, _) in BENCHMARKS.items():
        if key in results:
            return dataset_id, name
    data = results.get("inputs", {}).get("data") or {}
    path = data.get("path") or results.get("settings", {}).get("data") or "preference pairs"
    if data.get("sha256") is not None:  # a local file or folder (a Hub id has no content hash here)
        path = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return path, path


def eval_results_metadata(results: dict) -> list[EvalResult]:
    """The `model-index` entries of an evaluation: each RewardBench section (or RewardBench 2 subset) and its overall
    score in percent, or else the overall and per-subset accuracy in percent."""
    dataset_type, dataset_name = evaluation_dataset(results)
    common = {
        "task_type": "text-classification",
        "task_name": "Reward modeling",
        "dataset_type": dataset_type,
        "dataset_name": dataset_name,
        "dataset_split": results.get("settings", {}).get("split"),
        "metric_type": "accuracy",
    }
    entries = []
    for key in BENCHMARKS:
        for name, value in results.get(key, {}).items():
            if name != "missing":
                entries.append(EvalResult(metric_name=name, metric_value=round(float(value), 2), **common))
    if entries:
        return entries
    overall = results.get("overall", {}).get("accuracy")
    if overall is not None:
        entries.append(EvalResult(metric_name="accuracy", metric_value=round(100 * overall, 2), **common))
    for name, entry in results.get("subsets", {}).items():
        if entry.get("accuracy") is not None:
            value = round(100 * entry["accuracy"], 2)
            entries.append(EvalResult(metric_name=f"accuracy: {name}", metric_value=value, **common))
    return entries


def evaluation_section(results: dict) -> list[str]:
    """The card's evaluation: the benchmark's sections, the accuracy per subset, each objective alone, length bias."""
    dataset_id, dataset_name = evaluation_dataset(results)
    counts = results.get("counts") or {}
    lines = []
    if "stage" in results:
        split = results.get("settings", {}).get("split")
        where = [f"`{dataset_id}`"] if dataset_id != dataset_name else []
        where += [f"split `{split}`"] if split else []
        rule = (
            "A prompt counts when its chosen answer outscores every rejected one (a tie is wrong)."
            if results.get("layout") == "best-of-n"
            else "A pair counts when the chosen answer scores strictly higher."
        )
        lines.append(
            f"`armorm evaluate` on {dataset_name}" + (f" ({', '.join(where)})" if where else "") + ": "
            f"{counts.get('rows', '?')} rows scored, {counts.get('skipped', 0)} not scored (too long or malformed, "
            f"listed in the results file). {rule}"
        )
        lines.append("")
    for key, (_, name, kind) in BENCHMARKS.items():
        if key not in results:
            continue
        scores = results[key]
        lines += [f"| {name} {kind[:-1]} | score (%) |", "|---|---|"]
        lines += [f"| {section} | {value:.2f} |" for section, value in scores.items() if section != "missing"]
        if scores.get("missing"):
            lines += ["", f"Partial {name}: subsets absent from the data, so no overall score: `{scores['missing']}`."]
        lines.append("")
    subsets = results.get("subsets", {})
    if subsets:
        lines += ["| subset | accuracy | rows |", "|---|---|---|"]
        for name, entry in subsets.items():
            rows = entry.get("count")
            lines.append(f"| {name} | {_number(entry.get('accuracy'))} | {'—' if rows is None else rows} |")
        lines.append("")
    per_objective = (results.get("overall") or {}).get("per_objective") or {}
    if per_objective:
        lines += ["Each objective's reward r_i alone, as a reward model (accuracy over every row):", ""]
        lines += ["| objective | accuracy alone |", "|---|---|"]
        lines += [f"| `{name}` | {_number(value)} |" for name, value in per_objective.items()]
        lines.append("")
    bias = results.get("length_bias")
    if bias and bias["chosen_longer"]["count"] and bias["chosen_not_longer"]["count"]:
        lines.append(
            f"Length: the chosen answer is the longer one in {100 * bias['chosen_longer_share']:.1f} % of the rows; "
            f"accuracy {_number(bias['chosen_longer']['accuracy'])} on those, "
            f"{_number(bias['chosen_not_longer']['accuracy'])} on the others."
        )
        lines.append("")
    return lines[:-1] if lines and not lines[-1] else lines


def usage_snippet(model_id: str) -> str:
    """Python that scores, explains and compares with the `reward-scoring` pipeline of the `armorm` package; it runs as
    is against the checkpoint `model_id` (a test runs it, with stdin closed, on an assembled checkpoint)."""
    return f'''from transformers import pipeline

import modeling_armorm  # noqa: F401  (the `armorm` package: registers ArmoRM and the "reward-scoring" task)

rm = pipeline("reward-scoring", model="{model_id}")
conversation = [
    {{"role": "user", "content": "What is the capital of France?"}},
    {{"role": "assistant", "content": "The capital of France is Paris."}},
]
explanation = rm.explain(conversation)
print(f"score: {{explanation.score:.4f}}")
# s = Σ_i c_i r_i: r_i = objective i's reward, c_i = the weight the gating network gave it for this prompt.
for o in explanation.objectives:
    print(f"{{o.name:>40}}  reward {{o.reward:+.3f}}  weight {{o.coefficient:+.3f}}  contribution {{o.contribution:+.3f}}")
print(rm.compare("What is the capital of France?", "Paris.", "Lyon."))
'''


def remote_code_snippet(model_id: str) -> str:
    """Python that scores one conversation without the `armorm` package: the model code shipped with the checkpoint
    (`trust_remote_code=True` on both the model and the tokenizer, so nothing asks for confirmation)."""
    return f'''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_id = "{model_id}"
model = AutoModelForSequenceClassification.from_pretrained(model_id, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)

messages = [
    {{"role": "user", "content": "What is the capital of France?"}},
    {{"role": "assistant", "content": "The capital of France is Paris."}},
]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
with torch.no_grad():
    output = model(**inputs)

print(f"score: {{output.score.item():.4f}}")
contributions = output.coefficients[0] * output.rewards[0]  # c_i r_i, summing to the score
for i in contributions.abs().argsort(descending=True).tolist():
    name = model.config.objective_names[i]
    reward, weight = output.rewards[0, i].item(), output.coefficients[0, i].item()
    print(f"{{name:>40}}  reward {{reward:+.3f}}  weight {{weight:+.3f}}  contribution {{contributions[i].item():+.3f}}")
'''


def score_scale_section(info: CardInfo) -> list[str]:
    """What a score means: its distribution on the build's reference answers, and how to normalize it."""
    lines = [
        f"s is not a probability and not bounded to [0, 1]: it is a gated sum of linear rewards, the gating weights "
        f"summing to β = {info.logit_scale:.4g}, so its scale is the rewards' times β. The model was trained on "
        "differences of scores of answers to the same prompt (Bradley-Terry); a score alone is read against the "
        "scores of other answers.",
        "",
    ]
    statistics = info.score_statistics
    if statistics is None:
        return lines + [
            "No reference distribution was recorded for this checkpoint (`config.score_statistics` is None), so "
            "`normalize=True` refuses it."
        ]
    header = ["mean", "std", *(f"{q} %" for q in SCORE_QUANTILES)]
    cells = [statistics["mean"], statistics["std"], *(statistics.get(f"p{q}") for q in SCORE_QUANTILES)]
    return lines + [
        f"The scores of the {statistics.get('count', '?')} reference answers of this build (both answers of every "
        "pair the gating network was trained and validated on):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(_number(value) for value in cells) + " |",
        "",
        "A score above the 95 % quantile beats 95 % of those answers. `normalize=True` (the `reward-scoring` "
        "pipeline, `ArmoRMReward`, `armorm serve --normalize`) returns z = (s − mean) / std: 0 is the reference "
        "answers' mean, 1 one standard deviation above it. Only the score is normalized; rewards, gating weights "
        "and explanations stay raw. The numbers are `config.score_statistics`.",
    ]


def build_section(build: list[dict]) -> list[str]:
    """The commands of every stage in the order they ran (local paths as file names), then each one's settings."""
    if not build:
        return ["No stage reports were found beside the head files (they were written by other tools)."]
    lines = [
        "```bash",
        *(stage["command"] for stage in build),
        "```",
        "",
        "<details><summary>Settings of each stage</summary>",
        "",
    ]
    for stage in build:
        lines += [f"`{stage['stage']}`:", "", "```json", json.dumps(stage["settings"], indent=2), "```", ""]
    return [*lines, "</details>"]


def _card_data(info: CardInfo) -> ModelCardData:
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification",
        base_model=info.base_model,
        datasets=info.datasets or None,
        tags=TAGS,
        license=None,
        # model-index: the Hub shows these scores on the model page and in its evaluation widgets.
        eval_results=eval_results_metadata(info.eval_results) if info.eval_results else None,
        model_name=info.model_id if info.eval_results else None,
    )


def _learned_from_pairs(info: CardInfo) -> list[str]:
    """The note under the objective table for an objective not fitted on ratings (`preference`)."""
    if PREFERENCE_OBJECTIVE not in info.objectives:
        return []
    accuracy = info.objective_metrics.get(PREFERENCE_OBJECTIVE, {}).get("pairwise_accuracy")
    judged = f" (out-of-fold pairwise accuracy {_number(accuracy)})" if accuracy is not None else ""
    return [
        "",
        f"`{PREFERENCE_OBJECTIVE}`: Bradley-Terry score learned from preference pairs, not from ratings{judged}. Its "
        '"rows" are pairs and its α the L2 penalty of the Bradley-Terry fit, P(chosen ≻ rejected) = σ(w · (h_c − '
        "h_r)); the gate was trained on its out-of-fold rewards (cross-fitted by prompt), so no pair it trained on "
        "was scored by a head fitted on that pair.",
    ]


def _body(info: CardInfo) -> str:
    base = f"[`{info.base_model}`](https://huggingface.co/{info.base_model})" if info.base_model else "its backbone"
    k = len(info.objectives)
    verbosity = (
        f"`{info.objectives[info.verbosity_objective]}`" if info.verbosity_objective is not None else "none recorded"
    )
    parts = [
        f"# ArmoRM reward model on {info.base_model or 'a decoder backbone'}",
        "",
        f"An interpretable multi-objective reward model ([ArmoRM]({PAPER})) built on {base}. It scores the last "
        "assistant answer of a conversation:",
        "",
        "```",
        "h   = backbone(conversation)[last token]       response feature",
        "h_x = backbone(conversation)[gating position]  prompt feature, same forward pass",
        "r   = W h                                      one reward per objective",
        "g   = β · softmax(MLP(h_x) / temperature)      the prompt's weight for each objective",
        "s   = g · (r T) = c · r,  c = g Tᵀ             score; T removes each objective's verbosity component",
        "```",
        "",
        "`output.score` is s, `output.rewards` is r, `output.coefficients` is c: the score is a weighted sum of "
        "per-objective rewards that can be read and explained.",
        "",
        "## Objectives",
        "",
        f"k = {k} objectives; the verbosity objective v is {verbosity}. Each other objective's reward is "
        "decorrelated from verbosity as r'_i = r_i − λ_i r_v; α is the ridge penalty chosen by held-out MSE when "
        "W was fitted.",
        "",
        objective_table(info),
        *_learned_from_pairs(info),
        "",
        "## Gating network",
        "",
        f"MLP {info.hidden_size} → " + " → ".join([str(info.gating_hidden_dim)] * info.gating_n_hidden) + f" → {k}, "
        f"ReLU, temperature {info.gating_temperature:g}, β = {info.logit_scale:.4g}. The prompt feature is read at "
        + (f"the first token of the last `{info.gating_pattern_text!r}`" if info.gating_pattern_text else "the end")
        + " of the conversation (`config.gating_token_pattern`).",
    ]
    if info.gating_metrics:
        parts += ["", "| gating metric | value |", "|---|---|"]
        parts += [f"| {name} | {_number(value)} |" for name, value in info.gating_metrics.items()]
    parts += ["", "## Score scale", "", *score_scale_section(info)]
    if info.eval_results:
        parts += ["", "## Evaluation", "", *evaluation_section(info.eval_results)]
    parts += [
        "",
        "## Usage",
        "",
        "With the `armorm` package installed, the `reward-scoring` pipeline scores, compares, ranks and explains "
        "conversations:",
        "",
        "```python",
        usage_snippet(info.model_id).rstrip("\n"),
        "```",
        "",
        "Without the package, the model code shipped with the checkpoint runs instead (`trust_remote_code=True` on "
        "both the model and the tokenizer):",
        "",
        "```python",
        remote_code_snippet(info.model_id).rstrip("\n"),
        "```",
        "",
        '`transformers.pipeline("text-classification", model=...)` given a conversation rendered with the chat '
        "template (`tokenizer.apply_chat_template(messages, tokenize=False)`) returns the raw score (`problem_type` is "
        "`regression`: no sigmoid). With TRL the model is a reward model as it is: `output.logits[:, 0]` is the score.",
        "",
        "## How it was made",
        "",
        *build_section(info.build),
        "",
        "Method: Wang et al., *Interpretable Preferences via Multi-Objective Reward Modeling and Mixture-of-Experts* "
        f"({PAPER}).",
        "",
    ]
    return "\n".join(parts)


def build_model_card(info: CardInfo) -> ModelCard:
    """The card: YAML metadata (library, base model, datasets, tags) and the text above."""
    return ModelCard(f"---\n{_card_data(info).to_yaml()}\n---\n\n{_body(info)}")
