"""One GPU: an 8B Llama-3-shaped ArmoRM (random weights, bfloat16) on the transformers path: tokens/s and MFU by batch
size, the shared-prefix speed-up on GRPO-shaped groups, and the attention implementations compared; a JSON of it all.

    python benchmarks/bench_gpu.py --output bench_gpu.json                    # one CUDA GPU, ~20 GB of its memory
    python benchmarks/bench_gpu.py --preset small --device cpu --output /tmp/bench_gpu_smoke.json   # smoke, < 1 min

The model is `ArmoRMForRewardModeling` on a Llama backbone of Llama-3-8B's shape (ArmoRM-Llama3-8B's: hidden 4096,
32 layers, 32 heads, 8 key/value heads, MLP 14336, vocabulary 128,256) with ArmoRM's heads (19 objectives, gating MLP
3 x 1024), weights drawn at random on the device, the backbone in `--dtype` and the heads in float32 (as
`from_pretrained` keeps them). The inputs are random token ids: speed does not depend on what they say. Every figure
goes through `modeling_armorm.scoring.score_encoded`, the one scoring path of the pipeline, `ArmoRMReward`,
`armorm evaluate` and `armorm serve --backend transformers`. Each measurement is the median of `--repeats` timed runs
after a warm-up run; CUDA is synchronized around each.

1. **Throughput by batch size**: `--rows` conversations of `--seq-len` tokens (no two share a prompt) at each of
   `--batch-sizes`; tokens/s and MFU (model FLOPs: 2 x the backbone's parameters without the embedding per token,
   plus causal attention, 2 x layers x context x hidden per token; over `--peak-tflops`, else the device's dense
   bfloat16 peak from its name: H100 SXM/H200 989, H100 PCIe 756, A100 312, L40S 362, B200 2250 TFLOPS).
2. **Shared prefixes on GRPO-shaped groups**: `--groups` prompts of `--prompt-len` tokens, `--group-size`
   completions of each (lengths spread from a quarter of `--completion-len` to all of it), scored with
   `share_prefix=True` and `False` at `--grpo-batch-size`: the speed-up and the largest score difference.
3. **Attention implementations** (`sdpa`, `flash_attention_2` when the `flash-attn` package is installed; `eager`
   in the small preset): conversations of mixed lengths (an eighth of `--seq-len` to twice it) at batch size
   `--attention-batch-size`, right-padded; and the bare backbone on the same rows packed padding-free (one row,
   position ids restarting per conversation, no attention mask: flash-attention's variable-length path).

The JSON holds the machine, the arguments, and every measurement with its raw seconds.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import head_width, linear_multiply_adds, machine_facts, synchronize  # benchmarks/timing.py
from transformers import LlamaConfig
from transformers.utils import is_flash_attn_2_available

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling
from modeling_armorm.scoring import EncodedConversation, collate, length_sorted_batches, score_encoded


PRESETS = {
    # Llama-3-8B's shape (ArmoRM-Llama3-8B's backbone).
    "llama3-8b": dict(
        shape=dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        ),
        seq_len=512, rows=64, batch_sizes=[1, 2, 4, 8, 16, 32, 64], groups=8, group_size=8, prompt_len=512,
        completion_len=256, grpo_batch_size=64, attention_batch_size=16,
    ),
    # A smoke run of every step on a CPU, in seconds.
    "small": dict(
        shape=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=1024,
        ),
        seq_len=64, rows=8, batch_sizes=[1, 2, 4, 8], groups=2, group_size=4, prompt_len=48, completion_len=32,
        grpo_batch_size=8, attention_batch_size=4,
    ),
}  # fmt: skip
# Dense bfloat16 tensor-core peaks (TFLOPS, without sparsity), by a piece of the device's name; the first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("B200", 2250.0), ("A10G", 125.0), ("L4", 121.0)]  # fmt: skip
PAD_ID = 0


def build_model(shape: dict, device: str, dtype: torch.dtype) -> ArmoRMForRewardModeling:
    """A random-weight ArmoRM on a Llama backbone of `shape`, made on `device`: the backbone in `dtype`, the heads in
    float32."""
    config = ArmoRMConfig(text_config=LlamaConfig(pad_token_id=PAD_ID, **shape), num_objectives=19)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # an 8B model is made in bfloat16 at once, never in float32 first
    try:
        with torch.device(device):
            model = ArmoRMForRewardModeling(config)
    finally:
        torch.set_default_dtype(default)
    for name, module in model.named_children():
        if name != "model":
            module.float()
    model.reward_transform_matrix = model.reward_transform_matrix.float()
    return model.eval()


def flops_per_token(config, context: float) -> float:
    """Forward FLOPs per token: 2 x the backbone's matmul parameters (no embedding lookup), plus causal attention
    (QK^T and AV, 2 x 2 x context x the heads' width per layer, halved by the mask) at a mean context of `context` tokens."""
    layers = config.num_hidden_layers
    return 2 * layers * linear_multiply_adds(config) + 2 * layers * context * head_width(config)


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def timed(run, repeats: int) -> tuple[float, list[float], object]:
    """(median seconds, every run's seconds, the last result) of `run()` after one warm-up run."""
    result = run()
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = run()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), seconds, result


def random_rows(generator, lengths: list[int], vocab: int) -> list[EncodedConversation]:
    """Conversations of random ids, the gating position in the middle (no two share a prompt)."""
    rows = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=generator).tolist()
        rows.append(EncodedConversation(ids, gating_position=n // 2, answer_start=n // 2 + 1))
    return rows


def grpo_rows(generator, groups: int, size: int, prompt_len: int, completion_len: int, vocab: int):
    """`groups` prompts of `prompt_len` random ids (the gating position the last), `size` completions of each."""
    rows = []
    for _ in range(groups):
        prompt = torch.randint(1, vocab, (prompt_len,), generator=generator).tolist()
        for j in range(size):
            n = completion_len // 4 + (completion_len - completion_len // 4) * j // max(1, size - 1)
            answer = torch.randint(1, vocab, (n,), generator=generator).tolist()
            rows.append(EncodedConversation(prompt + answer, gating_position=prompt_len - 1, answer_start=prompt_len))
    return rows


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp(min=1e-2)).max().item()


def attention_implementations(small: bool) -> list[str]:
    names = ["sdpa"]
    if is_flash_attn_2_available():
        names.append("flash_attention_2")
    if small:
        names.append("eager")  # the switch itself is exercised where flash-attn is absent
    return names


@torch.inference_mode()
def compare_attention(model, args, generator, vocab: int) -> dict:
    """Scoring (padded batches) and the bare backbone padded and packed, under each attention implementation."""
    lengths = torch.randint(args.seq_len // 8, 2 * args.seq_len + 1, (args.rows,), generator=generator).tolist()
    rows = random_rows(generator, lengths, vocab)
    tokens = sum(lengths)
    device = next(model.parameters()).device
    batches = length_sorted_batches(lengths, args.attention_batch_size)
    padded = [
        {k: v.to(device) for k, v in collate([rows[i] for i in b], PAD_ID).items() if k != "gating_positions"}
        for b in batches
    ]
    packed = []
    for batch in padded:
        real = batch["attention_mask"].bool()
        packed.append({"input_ids": batch["input_ids"][real][None], "position_ids": batch["position_ids"][real][None]})
    results, reference = {}, None
    for name in attention_implementations(args.preset == "small"):
        model.model.set_attn_implementation(name)

        def bare(inputs):
            return [model.model(**batch, use_cache=False).last_hidden_state for batch in inputs]

        scoring, scoring_runs, output = timed(
            lambda: score_encoded(model, rows, args.attention_batch_size, PAD_ID, share_prefix=False), args.repeats
        )
        padded_s, padded_runs, h_padded = timed(lambda: bare(padded), args.repeats)
        entry = {
            "scoring_tokens_per_s": tokens / scoring,
            "bare_padded_tokens_per_s": tokens / padded_s,
            "raw_seconds": {"scoring": scoring_runs, "bare_padded": padded_runs},
        }
        try:
            packed_s, packed_runs, h_packed = timed(lambda: bare(packed), args.repeats)
        except Exception as error:  # noqa: BLE001 - an implementation without a packed path is a result
            entry["bare_packed_error"] = f"{type(error).__name__}: {error}"[:300]
        else:
            worst = max(
                ((p[b["attention_mask"].bool()] - q[0]).abs().max() / p.abs().max()).item()
                for p, q, b in zip(h_padded, h_packed, padded)
            )
            entry.update(
                bare_packed_tokens_per_s=tokens / packed_s, packed_over_padded=padded_s / packed_s,
                packed_hidden_relative_difference=worst,
            )  # fmt: skip
            entry["raw_seconds"]["bare_packed"] = packed_runs
        if reference is None:
            reference = output.score
        entry["score_relative_difference_to_sdpa"] = relative_difference(output.score, reference)
        results[name] = entry
        print(f"attention {name}: {json.dumps({k: v for k, v in entry.items() if k != 'raw_seconds'})}", flush=True)
    model.model.set_attn_implementation("sdpa")
    padded_tokens = sum(batch["input_ids"].numel() for batch in padded)
    return {"rows": args.rows, "tokens": tokens, "padded_tokens": padded_tokens, "by_implementation": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="Default: bfloat16 on CUDA.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="The device's dense peak for MFU (default: from its name).")
    parser.add_argument("--output", default="bench_gpu.json")
    for key, value in PRESETS["llama3-8b"].items():
        if key != "shape":
            kind = dict(type=int, nargs="+") if isinstance(value, list) else dict(type=int)
            parser.add_argument(f"--{key.replace('_', '-')}", **kind, help="Default: the preset's.")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key != "shape" and getattr(args, key) is None:
            setattr(args, key, value)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    started = time.perf_counter()
    model = build_model(preset["shape"], args.device, dtype)
    config = model.config.get_text_config()
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(0)
    peak = peak_tflops(args.device, args.peak_tflops)
    report = {
        "machine": machine_facts(),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
        "python": platform.python_version(),
        "arguments": {**vars(args), "dtype": str(dtype)},
        "backbone_parameters": sum(p.numel() for p in model.model.parameters()),
        "peak_tflops": peak,
        "flash_attn_installed": is_flash_attn_2_available(),
        "build_seconds": time.perf_counter() - started,
    }
    print(f"{report['device']}: model built in {report['build_seconds']:.0f} s", flush=True)

    # 1. Throughput and MFU by batch size.
    rows = random_rows(generator, [args.seq_len] * args.rows, vocab)
    tokens = args.rows * args.seq_len
    flops = flops_per_token(config, args.seq_len / 2) * tokens
    report["batch_sizes"] = {}
    for b in args.batch_sizes:
        seconds, runs, _ = timed(lambda b=b: score_encoded(model, rows, b, PAD_ID, share_prefix=False), args.repeats)
        entry = {"tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12, "raw_seconds": runs}
        entry["mfu"] = None if peak is None else entry["tflops"] / peak
        report["batch_sizes"][b] = entry
        print(f"batch {b}: {entry['tokens_per_s']:,.0f} tokens/s, {entry['tflops']:.1f} TFLOPS, MFU {entry['mfu']}",
              flush=True)  # fmt: skip
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        report["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30

    # 2. Shared prefixes on GRPO-shaped groups.
    rows = grpo_rows(generator, args.groups, args.group_size, args.prompt_len, args.completion_len, vocab)
    unique = args.groups * args.prompt_len + sum(len(r) - args.prompt_len for r in rows)
    runs = {}
    for share in (True, False):
        seconds, raw, output = timed(
            lambda share=share: score_encoded(model, rows, args.grpo_batch_size, PAD_ID, share_prefix=share),
            args.repeats,
        )
        runs[share] = (seconds, raw, output)
    report["grpo"] = {
        "conversations": len(rows),
        "tokens_whole": sum(len(r) for r in rows),
        "tokens_unique": unique,
        "shared_conversations_per_s": len(rows) / runs[True][0],
        "whole_conversations_per_s": len(rows) / runs[False][0],
        "speed_up": runs[False][0] / runs[True][0],
        "score_relative_difference": relative_difference(runs[True][2].score, runs[False][2].score),
        "score_absolute_difference": (runs[True][2].score - runs[False][2].score).abs().max().item(),
        "raw_seconds": {"shared": runs[True][1], "whole": runs[False][1]},
    }
    print(f"GRPO groups: {json.dumps({k: v for k, v in report['grpo'].items() if k != 'raw_seconds'})}", flush=True)

    # 3. Attention implementations, padded and packed.
    report["attention"] = compare_attention(model, args, generator, vocab)
    report["total_seconds"] = time.perf_counter() - started
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output} ({report['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    sys.exit(main())
