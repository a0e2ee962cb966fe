# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""RewardBench as an `evaluate` metric: scores of a reward model's answers → subset accuracies, sections, overall.

    import evaluate
    rewardbench = evaluate.load("metrics/rewardbench/rewardbench.py")
    rewardbench.compute(subset=["hep-go", ...], chosen_score=[1.2, ...], rejected_score=[0.3, ...])

    rewardbench2 = evaluate.load("metrics/rewardbench/rewardbench.py", "v2")
    rewardbench2.compute(id=["12", "ref:3", ...], subset=["Math", "Ties", ...],
                         chosen_scores=[[2.0], [1.5], ...], rejected_scores=[[0.1, 0.4, 0.2], [1.1, 0.3], ...])

The arithmetic is `evaluation.rewardbench` (the one home of the official subset table and formulas; the `armorm`
package must be installed), the same that `armorm evaluate` and `armorm rewardbench-score` use.
"""

import datasets
import evaluate

from evaluation.rewardbench import rewardbench2_scores, rewardbench_scores, subset_accuracy


_DESCRIPTION = """RewardBench (v1): per-subset pairwise accuracy of a reward model (a tie is wrong), the sections Chat,
Chat Hard, Safety and Reasoning as example-count-weighted means over the official subset table (math-prm weighted
984), Prior Sets as the mean of its four sets, and the overall score (weights 1, 1, 1, 1, 0.5), in percent.
Configuration `v2`: RewardBench 2's best-of-n accuracy per subset (a tie is wrong), its Ties
formula, and the overall score (the mean of the six subsets), in percent."""

_CITATION = """@article{lambert2024rewardbench,
  title={RewardBench: Evaluating Reward Models for Language Modeling},
  author={Lambert, Nathan and others},
  journal={arXiv preprint arXiv:2403.13787},
  year={2024}
}
@article{malik2025rewardbench2,
  title={RewardBench 2: Advancing Reward Model Evaluation},
  author={Malik, Saumya and others},
  journal={arXiv preprint arXiv:2506.01937},
  year={2025}
}"""

_INPUTS = """
Args (default configuration, one entry per pair):
    subset (`list[str]`): each pair's RewardBench subset (`alpacaeval-easy`, ..., `anthropic_hhh`, ...).
    chosen_score (`list[float]`): the reward model's score of the chosen answer.
    rejected_score (`list[float]`): its score of the rejected answer.
Args (`v2`, one entry per prompt):
    id (`list[str]`): the row id (`ref:<k>` / `tied:<k>` in the Ties subset).
    subset (`list[str]`): the RewardBench 2 subset (Factuality, Precise IF, Math, Safety, Focus, Ties).
    chosen_scores (`list[list[float]]`): the scores of the correct answers.
    rejected_scores (`list[list[float]]`): the scores of the incorrect answers.
Returns:
    `accuracy` (per subset, fractions) and the sections (v1) or subsets (v2) with `Score`, in percent; `missing`
    lists the official subsets absent from the input (then no `Score`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class RewardBench(evaluate.Metric):
    def _info(self):
        if self.config_name == "v2":
            features = datasets.Features(
                {
                    "id": datasets.Value("string"),
                    "subset": datasets.Value("string"),
                    "chosen_scores": datasets.Sequence(datasets.Value("float64")),
                    "rejected_scores": datasets.Sequence(datasets.Value("float64")),
                }
            )
        elif self.config_name == "default":
            features = datasets.Features(
                {
                    "subset": datasets.Value("string"),
                    "chosen_score": datasets.Value("float64"),
                    "rejected_score": datasets.Value("float64"),
                }
            )
        else:
            raise ValueError(f"Unknown configuration {self.config_name!r}: use the default (RewardBench) or `v2`.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=features,
            homepage="https://github.com/allenai/reward-bench",
        )

    def _compute(
        self, subset, chosen_score=None, rejected_score=None, id=None, chosen_scores=None, rejected_scores=None
    ):
        best_of_n = self.config_name == "v2"
        if best_of_n:
            rows = [(i, list(c), list(r)) for i, c, r in zip(id, chosen_scores, rejected_scores)]
        else:
            rows = [(j, [c], [r]) for j, (c, r) in enumerate(zip(chosen_score, rejected_score))]
        by_subset = {}
        for name, row in zip(subset, rows):
            by_subset.setdefault(name, []).append(row)
        accuracy = {name: subset_accuracy(name, group, best_of_n) for name, group in by_subset.items()}
        scores = rewardbench2_scores(accuracy) if best_of_n else rewardbench_scores(accuracy)
        return {"accuracy": accuracy, **scores}
