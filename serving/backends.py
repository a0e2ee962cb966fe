"""The two engines behind `armorm serve`: the transformers model with dynamic batching, and vLLM's async engine.

Both take conversations already encoded by `modeling_armorm.scoring.ChatEncoder` (tokens and the gating position
from the rendering) and return a `ScoreOutput` in the caller's order.

* `TransformersBackend`: requests that arrive together are merged into shared forwards, up to `max_batch_rows` rows
  or `max_wait_ms` after the first one waited, and run through `score_encoded` (the package's one scoring path) in a
  worker thread, one forward at a time (at most `max_batch_rows` rows and `max_batch_tokens` padded tokens), while
  the event loop keeps accepting requests.
* `VllmBackend`: every conversation is one request of vLLM's `AsyncLLM` (continuous batching, chunked prefill, prefix
  caching, tensor parallelism), scored by the ArmoRM plugin (`vllm_armorm`) at the gating position given.
"""

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import torch

from modeling_armorm import NonFiniteScoreError
from modeling_armorm.scoring import EncodedConversation, ScoreOutput, score_encoded


logger = logging.getLogger(__name__)

__all__ = ["TransformersBackend", "VllmBackend"]


@dataclass
class _Job:
    rows: list[EncodedConversation]
    future: asyncio.Future = field(repr=False)


def _split(out: ScoreOutput, sizes: list[int]) -> list[ScoreOutput]:
    parts, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        parts.append(ScoreOutput(out.score[sl], out.rewards[sl], out.gating_output[sl], out.coefficients[sl]))
        start += size
    return parts


class TransformersBackend:
    """`ArmoRMForRewardModeling` in this process; see the module docstring."""

    name = "transformers"

    def __init__(
        self, model, pad_id: int, max_batch_rows: int, max_wait_ms: float, max_batch_tokens: int | None = None
    ):
        self.model = model
        self.pad_id = pad_id
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.stats = {"requests": 0, "rows": 0, "batches": 0}
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._batches())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def score(self, rows: list[EncodedConversation]) -> ScoreOutput:
        job = _Job(rows, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _next_batch(self) -> list[_Job]:
        """The first waiting job, and every job that arrives within `max_wait` of it, up to `max_batch_rows` rows.

        A job whose client went away (the server cancels its handler, and with it the job's future) is dropped here,
        unscored."""
        jobs = [await self._queue.get()]
        while jobs[0].future.done():
            jobs = [await self._queue.get()]
        rows = len(jobs[0].rows)
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.max_batch_rows:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if not job.future.done():
                jobs.append(job)
                rows += len(job.rows)
        return [job for job in jobs if not job.future.done()]

    async def _batches(self) -> None:
        while True:
            jobs = await self._next_batch()
            if not jobs:
                continue
            rows = [row for job in jobs for row in job.rows]
            self.stats["requests"] += len(jobs)
            self.stats["rows"] += len(rows)
            self.stats["batches"] += 1
            try:
                out = await asyncio.to_thread(self._score_rows, rows)
            except NonFiniteScoreError:
                # A row of one request overflowed: score each request alone, so that only its own request fails,
                # with the error naming its rows in that request.
                for job in jobs:
                    await self._score_alone(job)
                continue
            except (
                Exception
            ) as error:  # the forward failed (out of memory, ...): those requests fail, the server stays
                logger.exception("scoring a batch of %d rows failed", len(rows))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job, part in zip(jobs, _split(out, [len(job.rows) for job in jobs])):
                if not job.future.done():
                    job.future.set_result(part)

    def _score_rows(self, rows: list[EncodedConversation]) -> ScoreOutput:
        return score_encoded(
            self.model, rows, self.max_batch_rows, self.pad_id, max_batch_tokens=self.max_batch_tokens
        )

    async def _score_alone(self, job: _Job) -> None:
        if job.future.done():
            return
        try:
            out = await asyncio.to_thread(self._score_rows, job.rows)
        except Exception as error:
            if not job.future.done():
                job.future.set_exception(error)
            return
        if not job.future.done():
            job.future.set_result(out)


class VllmBackend:
    """vLLM's `AsyncLLM` with the ArmoRM plugin; see the module docstring. `engine_args`: `AsyncEngineArgs` fields."""

    name = "vllm"

    def __init__(self, model_path: str, engine_args: dict):
        self.model_path = model_path
        self.engine_args = dict(engine_args)
        self.engine = None
        self.max_length = None
        self.counts = {"requests": 0, "rows": 0, "resubmitted": 0}

    @property
    def stats(self) -> dict:
        """The request counters, and vLLM's prefix-cache counters (tokens looked up, tokens found) when it logs them."""
        from vllm.v1.metrics.reader import get_metrics_snapshot

        metrics = {m.name: m.value for m in get_metrics_snapshot() if hasattr(m, "value")}
        cache = {
            k: int(metrics[f"vllm:prefix_cache_{k}"])
            for k in ("queries", "hits")
            if f"vllm:prefix_cache_{k}" in metrics
        }
        return {**self.counts, **{f"prefix_cache_{k}": v for k, v in cache.items()}}

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.model_path, runner="pooling", **self.engine_args)
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_length = self.engine.model_config.max_model_len

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    async def score(self, rows: list[EncodedConversation]) -> ScoreOutput:
        self.counts["requests"] += 1
        self.counts["rows"] += len(rows)
        outputs = await asyncio.gather(*(self._one(row, f"row {i}") for i, row in enumerate(rows)))
        return ScoreOutput(
            score=torch.tensor([o.score for o in outputs], dtype=torch.float32),
            rewards=torch.tensor([o.rewards for o in outputs], dtype=torch.float32),
            gating_output=torch.tensor([o.gating_output for o in outputs], dtype=torch.float32),
            coefficients=torch.tensor([o.coefficients for o in outputs], dtype=torch.float32),
        )

    async def _one(self, row: EncodedConversation, where: str):
        from vllm import TokensPrompt

        from vllm_armorm import ArmoRMOutput, ArmoRMRequestError, ErrorCode, pooling_params

        prompt = TokensPrompt(prompt_token_ids=list(row.input_ids))
        for skip_prefix_cache in (False, True):
            final = None
            # Cancelling this coroutine (a client that went away) aborts the vLLM request.
            params = pooling_params(row.gating_position, skip_prefix_cache=skip_prefix_cache, full_output=True)
            async for output in self.engine.encode(prompt, params, request_id=f"armorm-{uuid.uuid4().hex}"):
                final = output
            try:
                return ArmoRMOutput.from_vector(final.outputs.data, where)
            except ArmoRMRequestError as error:
                if error.code != ErrorCode.PROMPT_FEATURE_EVICTED or skip_prefix_cache:
                    raise
                # The gating token came from the prefix cache and its hidden state was evicted: compute it again.
                self.counts["resubmitted"] += 1
        raise AssertionError("unreachable")
