"""Evaluating an ArmoRM on preference data: `armorm evaluate` (`evaluation.evaluate`), the RewardBench v1 / v2
arithmetic (`evaluation.rewardbench`, which the `evaluate` metric module in `metrics/rewardbench` uses too) and
`armorm rewardbench-score` (`evaluation.rewardbench_score`)."""
