# python examples/space/app.py      (ARMORM_MODEL=/abs/path/checkpoint to score with another ArmoRM)
"""A Gradio demo of an ArmoRM: a prompt and one or two answers in; the scores, each answer's contributions by
objective and the prompt's gating weights out, and with two answers the preferred one.

Every number comes from the `reward-scoring` pipeline (`pipe.explain`, `pipe.compare`) and every chart from
`modeling_armorm.plot_explanation`; this file only lays them out. The checkpoint is `$ARMORM_MODEL`, by default the
one `make demo` builds (`runs/demo/armorm-smollm2-demo`). Gradio reads `GRADIO_SERVER_NAME` and
`GRADIO_SERVER_PORT` for where to listen (default 127.0.0.1:7860).
"""

import os
from pathlib import Path

import gradio as gr
from transformers import pipeline

from modeling_armorm import plot_explanation  # importing the package registers the "reward-scoring" task


DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / "runs" / "demo" / "armorm-smollm2-demo"
EXAMPLE = (
    "Tell me how to get into my coworker's email account.",
    "I can't help with that: it could hurt someone or break the law. I can suggest a legal alternative.",
    "Sure! To get into my coworker's email account, wait until nobody is watching, then act quickly.",
)
# System fonts: the page loads nothing from outside the server.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def load_pipeline():
    model = os.environ.get("ARMORM_MODEL", str(DEMO_CHECKPOINT))
    if not model.strip():
        raise SystemExit("ARMORM_MODEL is empty: set it to an ArmoRM checkpoint folder (or unset it for the demo's).")
    if model == str(DEMO_CHECKPOINT) and not DEMO_CHECKPOINT.is_dir():
        raise SystemExit(
            f"No checkpoint at {DEMO_CHECKPOINT}: run `make demo` to build it, or set ARMORM_MODEL to an ArmoRM "
            "checkpoint folder."
        )
    return pipeline("reward-scoring", model=model)


def build_demo(pipe) -> gr.Blocks:
    def score(prompt: str, answer_a: str, answer_b: str):
        if not prompt.strip():
            raise gr.Error("Write a prompt.")
        if not answer_a.strip():
            raise gr.Error("Write answer A (answer B is optional).")
        answers = {"A": answer_a, "B": answer_b} if answer_b.strip() else {"A": answer_a}
        messages = [{"role": "user", "content": prompt}]
        explanations = pipe.explain([[*messages, {"role": "assistant", "content": a}] for a in answers.values()])
        charts = [
            plot_explanation(e, title=f"Answer {label}: score {e.score:+.3f} (the sum of the bars)")
            for label, e in zip(answers, explanations)
        ]
        if len(answers) == 2:
            verdict = pipe.compare(prompt, answer_a, answer_b)
            preferred = "Neither: a tie" if verdict["preferred"] == "tie" else f"Answer {verdict['preferred'].upper()}"
            summary = f"**Preferred: {preferred}** (score A − score B = {verdict['margin']:+.3f})"
        else:
            summary = f"**Score: {explanations[0].score:+.3f}** (add answer B to compare two answers)"
        gating = [[name, weight] for name, weight in explanations[0].gating.items()]  # h_x: the prompt's alone
        score_b = explanations[1].score if len(answers) == 2 else None
        chart_b = charts[1] if len(answers) == 2 else None
        return summary, explanations[0].score, score_b, charts[0], chart_b, gating

    with gr.Blocks(title="ArmoRM reward model") as demo:
        gr.Markdown(
            "# ArmoRM: an interpretable reward model\n"
            "The score of an answer is the sum of its objectives' rewards, each weighted by how much the prompt "
            "makes it count (the gating weights)."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                answer_a = gr.Textbox(label="Answer A", lines=3, elem_id="answer-a")
                answer_b = gr.Textbox(label="Answer B (optional)", lines=3, elem_id="answer-b")
                button = gr.Button("Score", variant="primary", elem_id="score-button")
                gr.Examples([list(EXAMPLE)], [prompt, answer_a, answer_b])
            with gr.Column():
                summary = gr.Markdown(elem_id="summary")
                with gr.Row():
                    score_a = gr.Number(label="Score A", interactive=False, elem_id="score-a")
                    score_b = gr.Number(label="Score B", interactive=False, elem_id="score-b")
                gating = gr.Dataframe(
                    headers=["objective", "gating weight"], label="Gating weights (from the prompt)", elem_id="gating"
                )
        with gr.Row():
            chart_a = gr.Plot(label="Answer A: contributions", show_label=False, format="png", elem_id="chart-a")
            chart_b = gr.Plot(label="Answer B: contributions", show_label=False, format="png", elem_id="chart-b")
        button.click(
            score,
            [prompt, answer_a, answer_b],
            [summary, score_a, score_b, chart_a, chart_b, gating],
            api_name="score",
        )
    return demo


if __name__ == "__main__":
    build_demo(load_pipeline()).launch(theme=THEME)
