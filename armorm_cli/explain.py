"""Explain ArmoRM scores: each objective's reward, coefficient and contribution (they sum to the score), and a chart.

    armorm explain --model CKPT --input conversation.json
    armorm explain --model CKPT --input conversations.jsonl --json --top-k 5
    armorm explain --model CKPT --input conversation.json --plot explanation.png

s = Σ_i c_i r_i with c = g Tᵀ: r_i is objective i's raw reward, c_i the weight the prompt gave it (the gating weights
g mixed through the verbosity decorrelation T), c_i r_i its contribution. Objectives are listed by |contribution|,
largest first. Input as `armorm score` reads it (`--input FILE` or stdin, JSON Lines or one JSON conversation).
`--json` prints one object per conversation and line: `{"score", "objectives": [{"name", "reward", "coefficient",
"contribution"}], "gating": {objective: g_i}, "top"}`. `--plot out.png` draws the contributions as a bar chart
(`modeling_armorm.plot_explanation`; the suffix picks the format: `.png`, `.svg`, `.pdf`); with several
conversations, conversation i goes to `out-<i>.png`.
"""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from armorm_cli.score import ScoreConfig, load_pipeline, read_conversations
from modeling_armorm import Explanation, plot_explanation
from modeling_armorm.settings import Location, normalize_locations


__all__ = ["ARGUMENTS", "ExplainSettings", "format_explanation", "main", "plot_paths"]


@dataclass(kw_only=True)
class ExplainSettings:
    """What `armorm explain` adds to `armorm score`'s flags."""

    top_k: int = field(
        default=3, metadata={"help": "How many objectives `top` names (the largest contributions, by absolute value)."}
    )
    plot: Location | None = field(
        default=None,
        metadata={
            "help": "Draw the contributions to this image (`.png`, `.svg`); several conversations: `NAME-<i>.png`."
        },
    )

    def __post_init__(self):
        normalize_locations(self)
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0, got {self.top_k}.")


ARGUMENTS = (ScoreConfig, ExplainSettings)


def plot_paths(plot: str, count: int) -> list[Path]:
    """Where each conversation's chart goes: `plot` itself for one, `<stem>-<i><suffix>` beside it for several."""
    path = Path(plot)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def format_explanation(index: int, explanation: Explanation) -> str:
    """A conversation's score and every objective's `reward × coefficient = contribution`, with its gating weight."""
    width = max(len(o.name) for o in explanation.objectives)
    lines = [f"conversation {index}: score {explanation.score:+.4f}"]
    lines.append(f"  {'objective':{width}}  {'reward':>9} × {'coefficient':>11} = {'contribution':>12}  {'gating':>9}")
    for o in explanation.objectives:
        gating = explanation.gating[o.name]
        lines.append(
            f"  {o.name:{width}}  {o.reward:9.4f} × {o.coefficient:+11.4f} = {o.contribution:+12.4f}  {gating:9.4f}"
        )
    if explanation.top:
        lines.append(f"  top {len(explanation.top)}: " + ", ".join(o.name for o in explanation.top))
    return "\n".join(lines)


def main(config: ScoreConfig | None = None, settings: ExplainSettings | None = None, /, **kwargs) -> list[Explanation]:
    """Explain the scores of the conversations of `config.input` (or stdin), print them and draw `settings.plot`;
    returns the explanations. Pass the two configs, or their fields as keywords."""
    if config is None:
        own = {f.name for f in fields(ExplainSettings)}
        settings = settings or ExplainSettings(**{k: v for k, v in kwargs.items() if k in own})
        config = ScoreConfig(**{k: v for k, v in kwargs.items() if k not in own})
    settings = settings or ExplainSettings()
    if config.normalize:
        raise ValueError(
            "`armorm explain` is on the raw scale (the contributions sum to the raw score s), so it takes no "
            "`--normalize`; `armorm score --normalize` prints the normalized score."
        )
    conversations = read_conversations(config.input)
    explanations = load_pipeline(config).explain(conversations, top_k=settings.top_k)
    if config.json:
        for explanation in explanations:
            print(json.dumps(explanation.to_dict()))
    else:
        print("\n\n".join(format_explanation(i, e) for i, e in enumerate(explanations)))
    if settings.plot is not None:
        for i, (explanation, path) in enumerate(zip(explanations, plot_paths(settings.plot, len(explanations)))):
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_explanation(
                explanation, path, title=f"conversation {i}: score {explanation.score:+.3f} (the sum of the bars)"
            )
    return explanations
