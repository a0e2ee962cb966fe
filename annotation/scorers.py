# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""What `armorm annotate` scores with, behind one interface: `encode` a conversation, `score` a list of them.

Both scorers encode a conversation with `length_policy.ConversationEncoder` (the gating position from the rendering,
markup in an answer kept as text, the length policy of `armorm extract` and `armorm evaluate`); they differ in who
runs the forward pass:

* `TransformersScorer`: `modeling_armorm.scoring.score_encoded`, the path of the `reward-scoring` pipeline: a chunk's
  answers to one prompt share their tokens up to the gating position, so that prefix runs once
  (`modeling_armorm.prefix_sharing`).
* `VllmScorer` (`--backend vllm`): vLLM's offline engine with this package's plugin (`vllm_armorm.score_tokens`);
  under `torchrun`, one engine per process (`rank_engine_environment`).

`score` never raises over one conversation: a score that comes out NaN or infinite (a backbone overflow), or a request
vLLM refuses, is that conversation's reason, and the others are scored.
"""

import contextlib
import math
import os
from types import SimpleNamespace

import torch

from modeling_armorm.length_policy import ConversationEncoder, EncodedRow
from modeling_armorm.modeling_armorm import NonFiniteScoreError
from modeling_armorm.scoring import (
    EncodedConversation,
    ScoreOutput,
    model_gating_pattern,
    objective_names,
    pad_token_id,
    score_encoded,
)


__all__ = ["Scored", "TransformersScorer", "VllmScorer", "rank_engine_environment"]


class Scored:
    """Per-conversation outputs in the caller's order: `score` (n,), `rewards` and `gating_output` (n, k) as float32,
    NaN where `reasons[i]` says why conversation i has none."""

    def __init__(self, n: int, k: int):
        self.score = torch.full((n,), math.nan)
        self.rewards = torch.full((n, k), math.nan)
        self.gating_output = torch.full((n, k), math.nan)
        self.reasons: dict[int, str] = {}

    def put(self, indices: list[int], output: ScoreOutput) -> None:
        self.score[indices] = output.score
        self.rewards[indices] = output.rewards
        self.gating_output[indices] = output.gating_output


class _Encoding:
    """The shared half of both scorers: a conversation as tokens and gating position, or the reason it has none."""

    def __init__(self, tokenizer, pattern, max_length: int, truncate_prompt: bool, position_limit: int | None):
        self.tokenizer = tokenizer
        self.policy = ConversationEncoder(tokenizer, max_length, truncate_prompt, position_limit, pattern)

    def encode(self, messages: list[dict]) -> EncodedConversation | str:
        (row,) = self.policy.encode([[messages]])
        return row.sides[0] if isinstance(row, EncodedRow) else row

    def close(self) -> None:
        """Free what the scorer runs outside this thread (vLLM's engine); the encoding stays usable."""


class TransformersScorer(_Encoding):
    """An `ArmoRMForRewardModeling` (already on its device, in its dtype) and its tokenizer."""

    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int,
        truncate_prompt: bool,
        batch_size: int,
        max_batch_tokens: int | None,
    ):
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        super().__init__(tokenizer, model_gating_pattern(model, tokenizer), max_length, truncate_prompt, limit)
        self.model, self.config = model, model.config
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.objectives = objective_names(model.config)
        parameter = next(model.parameters())
        # What decides the numbers besides the weights and the tokens: the batches' make-up changes float rounding.
        self.identity = {
            "backend": self.name,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": parameter.device.type,
            "batch_size": batch_size,
            "max_batch_tokens": max_batch_tokens,
        }

    def score(self, encoded: list[EncodedConversation], progress=None) -> Scored:
        out = Scored(len(encoded), len(self.objectives))
        if not encoded:
            return out
        try:
            out.put(list(range(len(encoded))), self._run(encoded, progress))
        except NonFiniteScoreError:
            # Rare: find the conversations at fault by scoring each alone, and keep the others' scores.
            for i, row in enumerate(encoded):
                try:
                    out.put([i], self._run([row], None))
                except NonFiniteScoreError:
                    out.reasons[i] = (
                        "the score came out NaN or infinite (the backbone overflowed: load the model in bfloat16 or "
                        "float32 with `--dtype`)"
                    )
        return out

    def _run(self, encoded, progress) -> ScoreOutput:
        pad_id = pad_token_id(self.tokenizer)
        return score_encoded(
            self.model, encoded, self.batch_size, pad_id, progress, max_batch_tokens=self.max_batch_tokens
        )


class VllmScorer(_Encoding):
    """vLLM's offline `LLM` running the checkpoint with this package's plugin: the same encoding, the forward pass
    in vLLM (`vllm_armorm.score_tokens`, the gating position passed; a prompt's answers share it through vLLM's prefix
    cache). `engine_args`: `vllm.LLM` keywords (`dtype` among them). `rank_device`: under `torchrun`, this process's
    device, where its own engine runs (`rank_engine_environment`); None for one process."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tokenizer,
        *,
        max_length: int,
        truncate_prompt: bool,
        engine_args: dict,
        rank_device: torch.device | None = None,
    ):
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(model_path)
        # The checkpoint's own gating pattern, checked against the tokenizer's template (only the config is read).
        pattern = model_gating_pattern(SimpleNamespace(config=config), tokenizer)
        environment = {} if rank_device is None else rank_engine_environment(rank_device, engine_args)
        with _environment(environment):  # the engine's processes start here and keep what they were given
            self.llm = LLM(model=model_path, runner="pooling", **engine_args)
        model_config = self.llm.llm_engine.model_config
        super().__init__(tokenizer, pattern, max_length, truncate_prompt, model_config.max_model_len)
        self.config, self.objectives = config, objective_names(config)
        self.identity = {
            "backend": self.name,
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "engine_args": engine_args,
        }

    def close(self) -> None:
        """Stop the engine now: its process, and the client's daemon thread that reads its outputs. Left to the
        interpreter's exit, vLLM's finalizer wakes that thread while Python shuts down, which can abort the process
        ("terminate called without an active exception", exit code -6) after every output is written, and `torchrun`
        then reports the job failed. Calling it again does nothing."""
        client = self.llm.llm_engine.engine_core
        client.shutdown()
        thread = getattr(client, "output_queue_thread", None)  # a multiprocessing client's (vLLM 0.32)
        if thread is not None:
            thread.join(timeout=30)

    def score(self, encoded: list[EncodedConversation], progress=None) -> Scored:
        from vllm_armorm import ArmoRMRequestError, score_tokens

        out = Scored(len(encoded), len(self.objectives))
        if not encoded:
            return out
        results = score_tokens(self.llm, [row.input_ids for row in encoded], [row.gating_position for row in encoded])
        for i, result in enumerate(results):
            if isinstance(result, ArmoRMRequestError):
                out.reasons[i] = f"vLLM refused it: {result}"
                continue
            values = [[result.score], [result.rewards], [result.gating_output], [result.coefficients]]
            output = ScoreOutput(*(torch.tensor(value, dtype=torch.float32) for value in values))
            if not all(torch.isfinite(value).all() for value in (output.score, output.rewards, output.gating_output)):
                out.reasons[i] = "the score came out NaN or infinite (the backbone overflowed: try another `--dtype`)"
                continue
            out.put([i], output)
        if progress is not None:
            progress.update(len(encoded), sum(len(row) for row in encoded))
        return out


def rank_engine_environment(device: torch.device, engine_args: dict) -> dict[str, str]:
    """The environment in which one `torchrun` process starts its own vLLM engine: data parallelism as vLLM 0.32 offers
    it for a dense model. vLLM runs offline data parallelism itself only for mixture-of-experts models
    (`vllm/config/parallel.py`: "Offline data parallel mode is not supported/useful for dense models";
    `vllm/entrypoints/llm.py` refuses `LLM(data_parallel_size=N)` in one process), which leaves a dense model one
    independent engine per process on its share of the prompts: what each rank does here.

    The engine runs in a spawned process of its own: in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), or in a
    forked copy of it, vLLM finds the ranks' process group initialized and takes it for its own world
    (`vllm/distributed/parallel_state.py`, `init_distributed_environment`: "rank 1 in world size 2", then errors at
    exit). On a GPU it sees this rank's GPU alone, so one GPU per rank: spread a model over several GPUs with
    `tensor_parallel_size` in one process instead."""
    if int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1)) > 1:
        raise ValueError(
            "`--backend vllm` under torchrun runs one engine per process on one GPU each: drop `tensor_parallel_size` "
            "and `pipeline_parallel_size` from `--vllm-engine-args`, or run one process without torchrun with them."
        )
    environment = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        environment["CUDA_VISIBLE_DEVICES"] = gpus[device.index or 0]
    return environment


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`os.environ` with `values` set, as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
