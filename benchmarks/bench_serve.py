"""`armorm serve`: the transformers backend against today's server (a baseline checkout) and the vLLM backend, on the
same GRPO-shaped traffic, in one run.

    .venv/bin/python benchmarks/bench_serve.py                                  # CPU: a small random Llama ArmoRM
    .venv/bin/python benchmarks/bench_serve.py --backends transformers,baseline --rounds 3 --seconds 20
    .venv/bin/python benchmarks/bench_serve.py --preset llama3-8b --dtype bfloat16 --device cuda \\
        --vllm-python /path/to/vllm-venv/bin/python --vllm-engine-args '{"gpu_memory_utilization": 0.5}'

A random-weight ArmoRM (Llama backbone, the real Llama-3 tokenizer) is written once; then each backend is started as
an `armorm serve` process on 127.0.0.1 and the same load is sent to it: `--clients` clients, each posting one GRPO
group after the other for `--seconds` (a new prompt per group, `--group` completions of it, as a GRPO step sends
them), to `/score`. Reported per backend: conversations scored per second, p50 and p99 latency of a group, and for
vLLM the prefix-cache hit rate (tokens served from the cache / tokens looked up) on this traffic, with prefix caching
on and off. Every group two backends answered is checked to agree (largest relative score difference).

Backends (`--backends`): `transformers` (this checkout, this interpreter), `baseline` (`armorm serve --backend
transformers` of another checkout, `--baseline-checkout`, made a git worktree of `--baseline-commit` when absent, run
with this interpreter from that folder so that it imports that code: checked before the run), `vllm` and
`vllm-no-prefix-caching` (in `--vllm-python`'s environment). `transformers` and `baseline` run side by side: both
servers stay up and the `--rounds` rounds alternate between them (each round a fresh set of prompts, the same for
both); the vLLM servers follow, one after the other, the same rounds each. Figures are medians over the rounds.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serving_utils import free_port, run_load, running_server  # noqa: E402


sys.path.insert(0, str(REPO / "benchmarks"))
from timing import machine_facts  # noqa: E402


BACKENDS = ("transformers", "baseline", "vllm", "vllm-no-prefix-caching")

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


def start(label: str, command: list[str], work: Path, stack, size: int, env: dict | None = None) -> int:
    """Start one server in `stack` (its log: `work/label.log`) and warm it up with two groups of `size`; its port."""
    port = free_port()
    stack.enter_context(running_server([*command, "--port", str(port)], port, work / f"{label}.log", 1800, env))
    run_load(port, "/score", lambda i: {"conversations": group(10**7 + i, size)}, 2, 600, limit=2)
    return port


def load_round(port: int, first: int, args) -> dict:
    """One round of load on a running server, prompts `first`, `first + 1`, ...: throughput, latencies, cache hits,
    the answers by prompt index."""
    from tests.serving_utils import request

    _, before = request(port, "/info")
    result = run_load(
        port, "/score", lambda i: {"conversations": group(first + i, args.group)}, args.clients, args.seconds
    )
    _, after = request(port, "/info")
    summary = result.summary(lambda i: args.group)
    summary["latencies_ms"] = result.latencies_ms()
    summary["answers"] = {first + r["index"]: r["answer"]["scores"] for r in result.records if r["status"] == 200}
    summary["errors"] = sum(r["status"] != 200 for r in result.records)
    queries = after["stats"].get("prefix_cache_queries", 0) - before["stats"].get("prefix_cache_queries", 0)
    hits = after["stats"].get("prefix_cache_hits", 0) - before["stats"].get("prefix_cache_hits", 0)
    summary["prefix_cache_hit_rate"] = hits / queries if queries else None
    return summary


def baseline_checkout(args) -> Path:
    """The baseline's folder (a git worktree of `--baseline-commit`, made when absent), checked to be what a server
    started there imports."""
    checkout = Path(args.baseline_checkout).resolve()
    if not checkout.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), args.baseline_commit], check=True
        )
    # What `armorm serve` imports, then every module of a checkout that got loaded: none may come from this one (a
    # module the baseline lacks would fall through to the editable install's finder, i.e. to this checkout).
    probe = (
        "import json, sys, armorm_cli, serving.serve, serving.backends, modeling_armorm.scoring, "
        "modeling_armorm.pipeline; print(json.dumps(sorted({getattr(m, '__file__', None) or '' for m in "
        "list(sys.modules.values())})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    files = [Path(f).resolve() for f in json.loads(out) if Path(f).is_absolute()]
    ours = [f for f in files if f.is_relative_to(checkout)]
    foreign = [str(f) for f in files if f.is_relative_to(REPO) and not f.is_relative_to(REPO / ".venv")]
    if foreign or not ours:
        raise SystemExit(f"a server started in {checkout} would import {foreign or 'nothing of it'}")
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    shares = (checkout / "modeling_armorm" / "prefix_sharing.py").exists()
    print(f"baseline: {checkout} at {commit}; a server started there imports its {len(ours)} modules from there "
          f"(none from {REPO}); shared-prefix scoring {'present' if shares else 'absent'} there")  # fmt: skip
    return checkout


def largest_difference(answers: dict, reference: dict) -> tuple[float, float, int]:
    """(absolute, relative to |s| or 0.01, groups compared) over the prompts both sets of answers hold."""
    worst_abs = worst_rel = 0.0
    common = answers.keys() & reference.keys()
    for index in common:
        for a, b in zip(answers[index], reference[index], strict=True):
            worst_abs = max(worst_abs, abs(a - b))
            worst_rel = max(worst_rel, abs(a - b) / max(abs(b), 1e-2))
    return worst_abs, worst_rel, len(common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="Where the transformers backend runs (and builds the model).")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"Comma-separated, of {', '.join(BACKENDS)}.")
    parser.add_argument("--rounds", type=int, default=1, help="Rounds of load per backend; medians are reported.")
    parser.add_argument("--threads", type=int, default=2, help="Torch threads of the transformers servers.")
    parser.add_argument("--baseline-checkout", default="/tmp/armorm-baseline")
    parser.add_argument("--baseline-commit", default="9d52ffe", help="Today's code (before shared-prefix scoring).")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-engine-args", default="{}", help="More vLLM engine arguments (JSON).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--group", type=int, default=8, help="Completions per prompt (GRPO's group size).")
    parser.add_argument("--max-batch-rows", type=int, default=32)
    parser.add_argument(
        "--max-batch-tokens", type=int, help="The transformers server's token budget (not the baseline's)."
    )
    parser.add_argument("--checkpoint", help="Reuse a checkpoint folder written by an earlier run.")
    args = parser.parse_args()
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")

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
    threads = {"OMP_NUM_THREADS": str(args.threads)}

    transformers_args = ["--backend", "transformers", "--device", args.device]
    transformers_args += ["--max-batch-rows", str(args.max_batch_rows)]
    commands = {}
    if "transformers" in backends:
        extra = [] if args.max_batch_tokens is None else ["--max-batch-tokens", str(args.max_batch_tokens)]
        commands["transformers"] = ([sys.executable, *serve, *transformers_args, *extra], threads)
    if "baseline" in backends:
        checkout = baseline_checkout(args)
        # `python -m` puts the working folder first on sys.path: the server runs from the baseline's folder.
        in_checkout = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(checkout)]
        commands["baseline"] = ([*in_checkout, sys.executable, *serve, *transformers_args],
                                {**threads, "PYTHONPATH": str(checkout)})  # fmt: skip

    rounds: dict[str, list[dict]] = {label: [] for label in backends}
    with contextlib.ExitStack() as stack:  # the side-by-side servers: up together, rounds alternating
        ports = {
            label: start(label, command, work, stack, args.group, env) for label, (command, env) in commands.items()
        }
        for r in range(args.rounds):
            order = list(ports) if r % 2 == 0 else list(reversed(ports))
            for label in order:
                rounds[label].append(load_round(ports[label], 10**5 * (r + 1), args))
    for label, caching in (("vllm", True), ("vllm-no-prefix-caching", False)):
        if label not in backends:
            continue
        command = [args.vllm_python, *serve, "--backend", "vllm"]
        command += ["--vllm-engine-args", json.dumps({**engine, "enable_prefix_caching": caching})]
        with contextlib.ExitStack() as stack:
            port = start(label, command, work, stack, args.group)
            for r in range(args.rounds):
                rounds[label].append(load_round(port, 10**5 * (r + 1), args))

    prompt_tokens, total_tokens = token_counts(checkpoint, args.group)
    print(f"\nmachine: {machine_facts(args.threads)}")
    if any(label.startswith("vllm") for label in backends):
        vllm_version = subprocess.run(
            [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
        ).stdout.strip()
        print(f"vLLM {vllm_version}")
    print(f"model: preset {args.preset}, {args.dtype}; {args.clients} clients x {args.seconds:g} s x {args.rounds} "
          f"round(s) per backend; GRPO groups of {args.group}; transformers servers --max-batch-rows "
          f"{args.max_batch_rows}, {args.threads} torch thread(s); command: python {' '.join(sys.argv)}\n")  # fmt: skip
    median = statistics.median
    print("| backend | conversations/s (median) | per round | group p50 (ms) | group p99 (ms) | prefix-cache hit "
          "rate | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, runs in rounds.items():
        latencies = sorted(t for run in runs for t in run["latencies_ms"])
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
        rates = [run["prefix_cache_hit_rate"] for run in runs if run["prefix_cache_hit_rate"] is not None]
        rate = f"{100 * median(rates):.1f} %" if rates else "—"
        per_round = ", ".join(f"{run['rows_per_s']:.1f}" for run in runs)
        print(
            f"| {label} | {median(run['rows_per_s'] for run in runs):.1f} | {per_round} | "
            f"{median(latencies) if latencies else float('nan'):.0f} | {p99:.0f} | {rate} | "
            f"{sum(run['errors'] for run in runs)} |"
        )
    reference_label = "transformers" if "transformers" in rounds else None
    if reference_label:
        reference = {i: s for run in rounds[reference_label] for i, s in run["answers"].items()}
        for label, runs in rounds.items():
            if label == reference_label:
                continue
            paired = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(rounds[reference_label], runs)]
            answers = {i: s for run in runs for i, s in run["answers"].items()}
            worst_abs, worst_rel, compared = largest_difference(answers, reference)
            print(
                f"\ntransformers / {label}: {median(paired):.2f}x conversations/s (median of the rounds' ratios: "
                f"{', '.join(f'{x:.2f}' for x in paired)}); scores on the {compared} groups both answered: largest "
                f"difference {worst_abs:.1e} absolute, {worst_rel:.1e} relative (to |s| or 0.01)"
            )
    print(f"\ntokens per conversation: {total_tokens:.0f}, of which the shared prompt {prompt_tokens:.0f}")
    # The folder is kept for its server logs and the checkpoint a later run can reuse; it is ~160 MB per run.
    print(f"server logs and checkpoint kept in {work} (reuse: --checkpoint {checkpoint}; delete it when done)")


if __name__ == "__main__":
    main()
