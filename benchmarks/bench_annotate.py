"""`armorm annotate` on UltraFeedback-shaped data (5 answers per prompt) against scoring each conversation alone.

    .venv/bin/python benchmarks/bench_annotate.py                      # transformers: 8 prompts x 5 answers of ~200
    .venv/bin/python benchmarks/bench_annotate.py --backend vllm       # the same through vLLM (in .venv-vllm)
    .venv/bin/python benchmarks/bench_annotate.py --prompts 2 --repeats 1 --no-stage     # a quick look

SimPO and Online-RLHF annotated UltraFeedback prompts x 5 generated answers with ArmoRM, one conversation at a time.
The model is bench_score.py's: an ArmoRM with ArmoRM-Llama3-8B's head shape on SmolLM2-135M-Instruct's real weights
(float32), saved as a checkpoint in a temporary folder. The data is written there as an UltraFeedback-layout jsonl
(`instruction`, `completions[].response`): the first `--prompts` prompts of the UltraFeedback sample
(`../shared/data/raw/ultrafeedback_sample_train.jsonl`, real prompts of their real lengths), each with `--answers`
real UltraFeedback answers cut to 0.5x-1.5x `--answer-tokens` tokens (generated text where the sample is absent).

Every round times two ways on the whole file, one after the other (the order alternating between rounds), each way's
work being: read the file (`armorm_io.data.load_table`, `annotation.layouts.read_candidates`), encode every
conversation (`ConversationEncoder`: chat template, tokenizer, gating position), score it:

* annotate: `annotation.annotate.annotate(scorer, candidates, shards, shard_prompts)`, the stage's own scoring loop
  with the stage's default settings (shards written into a fresh folder each round, so nothing is reused). With
  `--backend transformers` a prompt's answers share the prompt (`score_encoded`, `share_prefix=True`); with
  `--backend vllm` they go to vLLM's offline engine together and share the prompt through its prefix cache (emptied
  before every timed way, so a round never reads what an earlier round left).
* each alone: the model card's way, one conversation per forward. transformers: `score_encoded` at batch size 1,
  `share_prefix=False`. vLLM: one `LLM.classify` call per conversation (waited for before the next is sent) that
  does not read the prefix cache.
* vLLM only, all at once, no prefix cache: every conversation in one `LLM.classify` call that does not read the
  prefix cache (vLLM's batching without the shared prompts).

The checkpoint is loaded (the vLLM engine started) once, untimed, as a long annotation job does. Then, unless
`--no-stage`, the whole stage runs once: `annotation.annotate.main` (hashing the inputs, loading the checkpoint or
starting an engine, reading, scoring, writing `scored/`, `pairs/` and `annotate.json`), timed end to end.

Reported: tokens/s over the unique tokens (each prompt once, through its assistant header, plus every answer) and over
all tokens (every conversation whole), the speed-up of annotate over each other way (median of the rounds' own
ratios), the share of each way's time inside the backbone's forward (transformers), and the largest score difference
between the ways. `--backend vllm` prepares the checkpoint and the data here (`.venv`: the GGUF reader) and runs the
measurement with `--vllm-python` (`.venv-vllm`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from timing import machine_facts, timed_inside, unique_token_counts  # noqa: E402  benchmarks/timing.py

from annotation.annotate import AnnotateSettings, annotate  # noqa: E402
from annotation.layouts import read_candidates  # noqa: E402
from armorm_io.data import load_table  # noqa: E402


UF_SAMPLE = REPO.parent / "shared" / "data" / "raw" / "ultrafeedback_sample_train.jsonl"
# vLLM on a CPU: no compilation (minutes on few cores), a bounded KV cache, its smallest block, the prefix cache on
# (a prompt's answers share it through the cache). The stage's one run gets them too (`--vllm-engine-args`).
VLLM_ENGINE = dict(enforce_eager=True, kv_cache_memory_bytes=1 << 30, block_size=32, enable_prefix_caching=True)


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint and the data (in .venv)


def prepare(work: Path, prompts: int, answers: int, answer_tokens: int) -> str:
    """Write the checkpoint (`work/checkpoint`) and the UltraFeedback-layout data (`work/ultrafeedback.jsonl`);
    where the data comes from."""
    from bench_score import build_model  # benchmarks/bench_score.py: needs the GGUF reader of .venv

    model, tokenizer = build_model("smollm2", "cpu", torch.float32)
    del model.config.text_config.quantization_config  # the GGUF's, but the weights are dequantized: plain float32
    model.save_pretrained(work / "checkpoint")
    tokenizer.save_pretrained(work / "checkpoint")
    rows, source = ultrafeedback_rows(tokenizer, prompts, answers, answer_tokens)
    with open(work / "ultrafeedback.jsonl", "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return source


def ultrafeedback_rows(tokenizer, prompts: int, answers: int, answer_tokens: int) -> tuple[list[dict], str]:
    """`prompts` rows of UltraFeedback's layout, each with `answers` answers, the j-th cut to about
    (0.5 + j / (answers - 1)) x `answer_tokens` tokens; where the text comes from."""
    targets = [round(answer_tokens * (0.5 + j / max(1, answers - 1))) for j in range(answers)]
    if UF_SAMPLE.exists():
        sample = [json.loads(line) for line in UF_SAMPLE.read_text().splitlines()]
        instructions = [row["prompt"] for row in sample[:prompts]]
        pool = [tokenizer(row[side], add_special_tokens=False)["input_ids"] for row in sample for side in ("chosen", "rejected")]  # fmt: skip
        source = f"the first {prompts} prompts of {UF_SAMPLE.name}, answers from its chosen and rejected answers"
    else:
        from bench_groups import text_of  # benchmarks/bench_groups.py

        instructions = [f"Question {p}: explain this note. Note: {text_of(tokenizer, p, 40 + 60 * (p % 5))}" for p in range(prompts)]  # fmt: skip
        pool = [tokenizer(text_of(tokenizer, 1000 + i, 320), add_special_tokens=False)["input_ids"] for i in range(50)]  # fmt: skip
        source = "generated prompts and answers (the UltraFeedback sample is absent)"
    rows, next_answer = [], 0
    for instruction in instructions:
        completions = []
        for target in targets:
            while len(pool[next_answer % len(pool)]) < target:  # an answer at least this long, cut to the target
                next_answer += 1
            completions.append({"response": tokenizer.decode(pool[next_answer % len(pool)][:target]).strip()})
            next_answer += 1
        rows.append({"instruction": instruction, "completions": completions})
    return rows, source


# ----------------------------------------------------------------------------------------------------------------
# The ways (in the backend's environment)


def read(data: str) -> list:
    candidates, skipped = read_candidates(load_table(data), "ultrafeedback")
    assert not skipped, f"the data must be read whole: {skipped}"
    return candidates


def encode_all(scorer, candidates) -> list:
    """Every conversation encoded as `annotate` encodes it, in its order (a prompt's answers one after the other)."""
    flat = [[*item.prompt, {"role": "assistant", "content": answer}] for item in candidates for answer in item.answers]
    encoded = [scorer.encode(messages) for messages in flat]
    reasons = [row for row in encoded if isinstance(row, str)]
    assert not reasons, f"every conversation must be encodable: {reasons[:3]}"
    return encoded


def annotate_way(scorer, data: str, shards: Path, shard_prompts: int) -> torch.Tensor:
    results, _ = annotate(scorer, read(data), shards, shard_prompts)
    return torch.cat([tensors["score"] for tensors, _ in results])


def alone_transformers(scorer, data: str) -> torch.Tensor:
    from modeling_armorm.scoring import pad_token_id, score_encoded

    encoded = encode_all(scorer, read(data))
    return score_encoded(scorer.model, encoded, 1, pad_token_id(scorer.tokenizer), share_prefix=False).score


def classify_without_cache(scorer, data: str, one_per_call: bool) -> torch.Tensor:
    """vLLM's `classify` on every conversation, none reading the prefix cache: one request per call (each waited for)
    or all in one call."""
    from vllm_armorm import ArmoRMOutput, pooling_params

    encoded = encode_all(scorer, read(data))
    requests = [
        ({"prompt_token_ids": list(row.input_ids)}, pooling_params(row.gating_position, True, full_output=True))
        for row in encoded
    ]
    calls = [[request] for request in requests] if one_per_call else [requests]
    outputs = []
    for call in calls:
        prompts, params = zip(*call)
        outputs += scorer.llm.classify(list(prompts), pooling_params=list(params), use_tqdm=False)
    scores = [ArmoRMOutput.from_vector(output.outputs.probs, where=f"prompt {i}").score for i, output in enumerate(outputs)]  # fmt: skip
    return torch.tensor(scores)


def load_scorer(backend: str, checkpoint: str, settings: AnnotateSettings, engine_args: dict):
    """The scorer `armorm annotate` builds for `backend` with `settings`."""
    from annotation.scorers import TransformersScorer, VllmScorer
    from armorm_io.backbone import load_tokenizer
    from armorm_io.checkpoints import load_model

    tokenizer = load_tokenizer(checkpoint)
    options = {"max_length": settings.max_length, "truncate_prompt": settings.truncate_prompt}
    if backend == "vllm":
        return VllmScorer(checkpoint, tokenizer, engine_args={**engine_args, "dtype": "float32"}, **options)
    model = load_model(checkpoint, "float32", "cpu")
    return TransformersScorer(
        model, tokenizer, batch_size=settings.batch_size, max_batch_tokens=settings.max_batch_tokens, **options
    )


def measure(args, work: Path, source: str) -> None:
    checkpoint, data = str(work / "checkpoint"), str(work / "ultrafeedback.jsonl")
    settings = AnnotateSettings()  # the stage's defaults
    engine_args = {**VLLM_ENGINE, **json.loads(args.vllm_engine_args)}
    start = time.perf_counter()
    scorer = load_scorer(args.backend, checkpoint, settings, engine_args)
    load_seconds = time.perf_counter() - start
    candidates = read(data)
    encoded = encode_all(scorer, candidates)
    unique, whole, prefix = unique_token_counts(encoded)
    answer_lengths = [len(row) - row.answer_start for row in encoded]  # the answer and its end of turn

    shards = iter(range(10**6))
    ways = {
        "annotate": lambda path: annotate_way(scorer, path, work / f"shards-{next(shards)}", settings.shard_prompts)
    }
    if args.backend == "vllm":
        ways["all at once, no prefix cache"] = lambda path: classify_without_cache(scorer, path, one_per_call=False)
        ways["each alone"] = lambda path: classify_without_cache(scorer, path, one_per_call=True)
    else:
        ways["each alone"] = lambda path: alone_transformers(scorer, path)

    warm = work / "warm-up.jsonl"  # the first prompt alone: allocator, kernels, the engine's first steps
    warm.write_text(Path(data).read_text().splitlines()[0] + "\n")

    def timed(run, path):
        if args.backend == "vllm":
            scorer.llm.reset_prefix_cache()  # nothing from an earlier way or round
            begin = time.perf_counter()
            output = run(path)
            return time.perf_counter() - begin, float("nan"), output
        return timed_inside(scorer.model.model, "forward", lambda: run(path))

    for run in ways.values():
        timed(run, str(warm))
    rounds, scores = {name: [] for name in ways}, {name: [] for name in ways}
    for r in range(args.repeats):
        for name in list(ways) if r % 2 == 0 else list(reversed(ways)):
            seconds, in_backbone, output = timed(ways[name], data)
            rounds[name].append(dict(seconds=seconds, in_backbone=in_backbone))
            scores[name].append(output)
    reference = scores["annotate"][0]
    differences = {}
    for name, outputs in scores.items():
        worst = max((s - reference).abs().max().item() for s in outputs)
        relative = max(((s - reference).abs() / reference.abs().clamp(min=1e-2)).max().item() for s in outputs)
        differences[name] = (worst, relative)

    stage = None
    if not args.no_stage:
        from annotation.annotate import main as annotate_stage

        # The stage loads its own model (starts its own engine); the scorer above stays, idle.
        start = time.perf_counter()
        report = annotate_stage(
            model=checkpoint, data=data, out=str(work / "stage"), backend=args.backend, dtype="float32",
            vllm_engine_args=json.dumps(engine_args),
        )  # fmt: skip
        stage = dict(seconds=time.perf_counter() - start, report=report)

    median = statistics.median
    backend = args.backend
    if backend == "vllm":
        import vllm

        backend = f"vLLM {vllm.__version__} (CPU build, offline `LLM`, engine arguments {json.dumps(engine_args)})"
    print(f"\n### `armorm annotate`, {args.backend} backend: UltraFeedback-shaped prompts x {args.answers} answers\n")
    command = sys.argv[: sys.argv.index("--workdir")] if args.workdir else sys.argv  # the command that was typed
    command = [os.path.relpath(command[0], REPO), *command[1:]]
    threads = args.threads if args.backend == "transformers" else None  # vLLM binds its own threads: as it left them
    began = time.strftime("%d %b %Y %H:%M", time.gmtime(args.began))
    print(
        f"Run {began}–{time.strftime('%H:%M', time.gmtime())} UTC. Machine at the end: {machine_facts(threads)}. "
        f"Command: `python {' '.join(command)}`.\n"
    )
    print(
        f"Model: ArmoRM heads on SmolLM2-135M-Instruct (float32), {backend}; loaded once in {load_seconds:.1f} s "
        f"(untimed). Data: {source}: {len(candidates)} prompts x {args.answers} answers; prompts "
        f"{min(prefix)}-{max(prefix)} tokens (median {median(prefix):.0f}, what their answers share: through the "
        f"assistant header, the chat template's system turn included), answers {min(answer_lengths)}-"
        f"{max(answer_lengths)} tokens (median "
        f"{median(answer_lengths):.0f}); {unique:,} unique tokens, {whole:,} as whole conversations "
        f"({whole / unique:.2f}x). annotate's settings: the stage's defaults (batch size {settings.batch_size}, "
        f"max batch tokens {settings.max_batch_tokens}, {settings.shard_prompts} prompts per shard). Medians of "
        f"{args.repeats} rounds, the ways' order alternating.\n"
    )
    print("| way | unique tokens/s | all tokens/s | annotate's speed-up over it | in the backbone, same run | "
          "largest score difference from annotate (abs., rel.) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, runs in rounds.items():
        seconds = median(r["seconds"] for r in runs)
        speed_up = median(r["seconds"] / a["seconds"] for r, a in zip(runs, rounds["annotate"]))
        share = median(r["in_backbone"] / r["seconds"] for r in runs)
        share = "—" if share != share else f"{share:.1%}"
        worst, relative = differences[name]
        print(
            f"| {name} | {unique / seconds:,.0f} | {whole / seconds:,.0f} | {speed_up:.2f}× | {share} | "
            f"{worst:.1e}, {relative:.1e} |"
        )
    raw = {name: [round(r["seconds"], 2) for r in runs] for name, runs in rounds.items()}
    ratios = {
        name: [round(r["seconds"] / a["seconds"], 2) for r, a in zip(runs, rounds["annotate"])]
        for name, runs in rounds.items()
        if name != "annotate"
    }
    print(f"\nRaw seconds per way and round: {raw}. annotate's speed-up per round: {ratios}.")
    if stage is not None:
        run = stage["report"]["metrics"]["run"]
        counts = stage["report"]["metrics"]["counts"]
        loading = "engine start" if args.backend == "vllm" else "checkpoint load"
        print(
            f"\nThe whole stage once (`annotation.annotate.main`: input hashes, {loading}, reading, scoring, writing "
            f"the outputs): {stage['seconds']:.1f} s; its report: "
            f"{run['tokens_per_second']:,.0f} tokens/s (all tokens, its scoring loop), {counts['pairs']} pairs, "
            f"{counts['skipped_rows']} rows skipped."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--answers", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=200, help="The answers' mean length (0.5x to 1.5x).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="Torch threads (transformers).")
    parser.add_argument("--no-stage", action="store_true", help="Skip the one run of the whole stage.")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-engine-args", default="{}", help="More vLLM engine arguments (JSON).")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # set when the script runs itself in .venv-vllm
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--began", type=float, default=time.time(), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.workdir:
        return measure(args, Path(args.workdir), args.source)
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as folder:
        work = Path(folder)
        source = prepare(work, args.prompts, args.answers, args.answer_tokens)
        if args.backend == "transformers":
            return measure(args, work, source)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(REPO / ".venv-vllm" / "cache")),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the measuring process
        }
        command = [
            args.vllm_python,
            __file__,
            *sys.argv[1:],
            "--workdir",
            folder,
            "--source",
            source,
            "--began",
            str(args.began),
        ]
        subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
