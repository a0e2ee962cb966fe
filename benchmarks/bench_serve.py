"""`armorm serve`: the transformers backend against the vLLM backend on the same GRPO-shaped traffic, in one run.

    .venv/bin/python benchmarks/bench_serve.py                                  # CPU: a small random Llama ArmoRM
    .venv/bin/python benchmarks/bench_serve.py --preset llama3-8b --dtype bfloat16 --device cuda \\
        --vllm-python /path/to/vllm-venv/bin/python --vllm-engine-args '{"gpu_memory_utilization": 0.5}'

A random-weight ArmoRM (Llama backbone, the real Llama-3 tokenizer) is written once; then each backend is started as
an `armorm serve` process on 127.0.0.1 and the same load is sent to it: `--clients` clients, each posting one GRPO
group after the other for `--seconds` (a new prompt per group, `--group` completions of it, as a GRPO step sends
them), to `/score`. Reported per backend: conversations scored per second, p50 and p99 latency of a group, and for
vLLM the prefix-cache hit rate (tokens served from the cache / tokens looked up) on this traffic, with prefix caching
on and off. Every group both backends answered is checked to agree (largest relative score difference). The
transformers backend runs in this interpreter's environment, the vLLM backend in `--vllm-python`'s.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serving_utils import free_port, run_load, running_server  # noqa: E402


PRESETS = {
    # A small model that makes the CPU run take minutes, not hours.
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    # Llama-3-8B's shape (ArmoRM-Llama3-8B's backbone), random weights.
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}  # fmt: skip
SYSTEM = "You are a helpful assistant. Think step by step, keep the answer correct and short, and say when unsure."
TOPICS = ["the sky", "tides", "rainbows", "volcanoes", "glaciers", "comets", "deserts", "monsoons", "coral reefs"]
ANSWER_WORDS = "the because light water energy pressure moves heat cools rises falls scatters bends".split()


def build_checkpoint(folder: Path, preset: str, dtype: str, device: str) -> None:
    import torch

    from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer
    from tests.utils import llama3_tokenizer, tiny_llama_config

    tokenizer = llama3_tokenizer()
    text_config = tiny_llama_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=8192, **PRESETS[preset]
    )
    config = ArmoRMConfig(
        text_config=text_config, num_objectives=19, **gating_pattern_from_tokenizer(tokenizer).config_kwargs()
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = ArmoRMForRewardModeling(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def group(index: int, size: int) -> list[list[dict]]:
    """GRPO group `index`: one new prompt and `size` completions of different lengths."""
    topic = TOPICS[index % len(TOPICS)]
    # A GRPO prompt carries its task: here a note of 120 words, different for every group.
    note = " ".join(ANSWER_WORDS[(index * 13 + t * 5) % len(ANSWER_WORDS)] for t in range(120))
    question = f"Question {index}: read this note on {topic} and explain it simply. Note: {note}."
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    completions = []
    for j in range(size):
        words = [ANSWER_WORDS[(index * 31 + j * 7 + t) % len(ANSWER_WORDS)] for t in range(12 + 9 * j)]
        completions.append([*prompt, {"role": "assistant", "content": f"About {topic}: " + " ".join(words) + "."}])
    return completions


def token_counts(checkpoint: Path, size: int) -> tuple[float, float]:
    """Mean prompt and conversation lengths in tokens over a sample of the groups (as `ChatEncoder` encodes them)."""
    from transformers import AutoTokenizer

    from modeling_armorm.scoring import ChatEncoder

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(checkpoint))
    rows = [encoder.encode(c) for i in range(20) for c in group(i, size)]
    return sum(r.answer_start for r in rows) / len(rows), sum(len(r) for r in rows) / len(rows)


def measure(command: list[str], args, log: Path) -> dict:
    """Start the server, warm it up with two groups, send the load; throughput, latency, cache hits, the answers."""
    from tests.serving_utils import request

    port = free_port()
    with running_server([*command, "--port", str(port)], port, log, timeout=1800):
        run_load(port, "/score", lambda i: {"conversations": group(10**6 + i, args.group)}, 2, 600, limit=2)
        _, before = request(port, "/info")
        result = run_load(
            port, "/score", lambda i: {"conversations": group(i, args.group)}, args.clients, args.seconds
        )
        _, after = request(port, "/info")
    summary = result.summary(lambda i: args.group)
    summary["answers"] = {r["index"]: r["answer"]["scores"] for r in result.records if r["status"] == 200}
    summary["errors"] = sum(r["status"] != 200 for r in result.records)
    queries = after["stats"].get("prefix_cache_queries", 0) - before["stats"].get("prefix_cache_queries", 0)
    hits = after["stats"].get("prefix_cache_hits", 0) - before["stats"].get("prefix_cache_hits", 0)
    summary["prefix_cache_hit_rate"] = hits / queries if queries else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="Where the transformers backend runs (and builds the model).")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-engine-args", default="{}", help="More vLLM engine arguments (JSON).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--group", type=int, default=8, help="Completions per prompt (GRPO's group size).")
    parser.add_argument("--max-batch-rows", type=int, default=32)
    parser.add_argument("--checkpoint", help="Reuse a checkpoint folder written by an earlier run.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else work / "checkpoint"
    if not args.checkpoint:
        build_checkpoint(checkpoint, args.preset, args.dtype, args.device)
    serve = ["-m", "armorm_cli", "serve", "--model", str(checkpoint), "--dtype", args.dtype]
    engine = {"enable_prefix_caching": True, **json.loads(args.vllm_engine_args)}
    if args.device == "cpu":
        # The CPU backend: no compilation (minutes on few cores), a bounded KV cache, its smallest block.
        engine = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "block_size": 32, **engine}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".venv-vllm" / "cache"))

    runs = {}
    transformers_command = [sys.executable, *serve, "--backend", "transformers", "--device", args.device]
    transformers_command += ["--max-batch-rows", str(args.max_batch_rows)]
    runs["transformers"] = measure(transformers_command, args, work / "transformers.log")
    for label, caching in (("vllm", True), ("vllm, prefix caching off", False)):
        command = [args.vllm_python, *serve, "--backend", "vllm"]
        command += ["--vllm-engine-args", json.dumps({**engine, "enable_prefix_caching": caching})]
        runs[label] = measure(command, args, work / f"vllm-prefix-caching-{'on' if caching else 'off'}.log")

    reference = runs["transformers"]["answers"]
    worst_abs = worst_rel = 0.0
    for label in ("vllm", "vllm, prefix caching off"):
        for index, scores in runs[label]["answers"].items():
            for a, b in zip(scores, reference.get(index, [])):
                worst_abs = max(worst_abs, abs(a - b))
                worst_rel = max(worst_rel, abs(a - b) / max(abs(b), 1e-2))
    prompt_tokens, total_tokens = token_counts(checkpoint, args.group)

    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    vllm_version = subprocess.run(
        [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch_version}, "
          f"vLLM {vllm_version}, Python {platform.python_version()}")  # fmt: skip
    print(f"model: preset {args.preset}, {args.dtype}; {args.clients} clients x {args.seconds:g} s; GRPO groups of "
          f"{args.group}; transformers backend --max-batch-rows {args.max_batch_rows}\n")  # fmt: skip
    print("| backend | conversations/s | group p50 (ms) | group p99 (ms) | prefix-cache hit rate | errors |")
    print("|---|---|---|---|---|---|")
    for label, run in runs.items():
        rate = "—" if run["prefix_cache_hit_rate"] is None else f"{100 * run['prefix_cache_hit_rate']:.1f} %"
        print(
            f"| {label} | {run['rows_per_s']:.1f} | {run['p50_ms']:.0f} | {run['p99_ms']:.0f} | {rate} | "
            f"{run['errors']} |"
        )
    base = runs["transformers"]["rows_per_s"]
    print(f"\nthroughput vLLM / transformers: {runs['vllm']['rows_per_s'] / base:.2f}x (prefix caching on), "
          f"{runs['vllm, prefix caching off']['rows_per_s'] / base:.2f}x (off)")  # fmt: skip
    print(f"largest score difference between the backends on the same groups: {worst_abs:.1e} absolute, "
          f"{worst_rel:.1e} relative (to |s| or 0.01)")  # fmt: skip
    print(f"tokens per conversation: {total_tokens:.0f}, of which the shared prompt {prompt_tokens:.0f}")


if __name__ == "__main__":
    main()
