"""Serve an ArmoRM checkpoint over HTTP: a reward endpoint for RL frameworks, on vLLM or on the transformers model.

    armorm serve --model CKPT [--backend transformers|vllm] [--host 127.0.0.1] [--port 8000]

Endpoints (JSON in, JSON out; a malformed request gets a 422 that names the row and the fix, the others keep flowing):

* `POST /get_reward`: OpenRLHF's remote reward protocol. `{"query": [...], "prompts": [...], "labels": [...]}` →
  `{"rewards": [s...], "scores": [s...], "extra_logs": {"armorm/<objective>": [r...], ...}}`. Each query is its
  prompt followed by the response (as OpenRLHF decodes it, special tokens included); h_x is read at the end of the
  prompt, whose length comes from `prompts`, so nothing the response writes can move it. A prompt that holds the
  template's markup is used as rendered; a plain one becomes a user turn.
* `POST /score`: `{"conversations": [[{"role", "content"}, ...], ...]}` (each ending with the assistant's answer),
  or TRL's `{"prompts": [...], "completions": [...]}` (strings or message lists) → `{"objective_names",
  "scores", "rewards", "gating_output", "coefficients"}` (s, r, g = β softmax(MLP(h_x)/τ), c = g Tᵀ, per row).
  `ArmoRMReward(url=...)` scores through it.
* `GET /info` (the checkpoint's folder name, backend, objectives, `normalize`, `score_statistics`, counters) and
  `GET /health`.

With `--normalize`, every score returned (`/score`'s `scores`, `/get_reward`'s `rewards` and `scores`) is
z = (s − mean) / std of the checkpoint's reference answers (`config.score_statistics`); the per-objective rewards,
gating weights and coefficients stay raw. A checkpoint without the statistics is refused at startup.

One request cannot stall the others: a body over `--max-body-mb` gets a 413 before it is read whole, one over 1 MiB
is read once the smaller requests pause (waiting at most 0.1 s); a conversation with more characters than the
model's positions could hold (`max_length` × the characters of the tokenizer's longest token) gets a 422 before it is
tokenized; the rows are encoded a few at a time in worker threads, so other requests' rows take the tokenizer in
between; a client that hangs up is dropped with its rows still queued (they cost no forward). A client fault gets a
4xx that names the row; a model fault (a non-finite score) a 500 that names the row.

Backends: `transformers` (the default; needs no vLLM) merges concurrent requests into shared forwards;
`vllm` runs vLLM's async engine with the ArmoRM plugin (install vLLM; its engine settings go in `--vllm-engine-args`).
Every conversation is encoded here, by the package's one scoring path (`modeling_armorm.scoring.ChatEncoder`).
"""

import asyncio
import functools
import json
import logging
import time
import types
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling_armorm.settings import (
    BackendSettings,
    DeviceSettings,
    DtypeSettings,
    Location,
    ScaleSettings,
    fit_dtype,
    normalize_locations,
    resolve_device,
    torch_dtype,
)


logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeSettings(BackendSettings, ScaleSettings, DeviceSettings, DtypeSettings):
    """The knobs of `armorm serve`, with the shared backend, score scale, device (the transformers backend's) and dtype
    (both backends')."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (`0.0.0.0`: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    max_batch_rows: int = field(
        default=32,
        metadata={"help": "Transformers backend: most conversations per forward (concurrent requests merge)."},
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Transformers backend: padded tokens per forward (rows x the longest row): a forward holds at most "
            "`max_batch_rows` rows and no more than fit this budget (default on a CPU: 4096 where the batches are packed, "
            "1024 padded for a backbone that cannot pack, so that short and long answers run apart; rows only on a GPU)."
        },
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "Transformers backend: how long a waiting request waits for others to join it."}
    )
    max_request_rows: int = field(
        default=8192, metadata={"help": "Most conversations one request may hold; a larger one gets a 422."}
    )
    max_body_mb: float = field(
        default=64.0,
        metadata={
            "help": "Largest request body in MiB; a larger one gets a 413 before it is read whole (64 MiB holds "
            "a few thousand conversations of a few thousand tokens)."
        },
    )


@dataclass(kw_only=True)
class ServeConfig(ServeSettings):
    """`armorm serve`: the checkpoint to serve, and the server's settings."""

    model: Location = field(
        metadata={"help": "Checkpoint folder (the vLLM backend also serves the released RLHFlow layout as it is)."}
    )

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)
        for name in ("max_batch_rows", "max_request_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"`max_batch_tokens` must be at least 1, got {self.max_batch_tokens}.")
        if not self.max_body_mb > 0:
            raise ValueError(f"`max_body_mb` must be positive, got {self.max_body_mb}.")


ARGUMENTS = (ServeConfig,)


def checkpoint_config(path: str):
    """The `ArmoRMConfig` of a checkpoint folder in either layout (the released one through the converter)."""
    from modeling_armorm import ArmoRMConfig
    from modeling_armorm.rlhflow import rlhflow_config

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {path}: give an ArmoRM checkpoint folder to `--model`.")
    if json.loads(config_file.read_text()).get("model_type") == ArmoRMConfig.model_type:
        return ArmoRMConfig.from_pretrained(path)
    return rlhflow_config(json.loads(config_file.read_text()))


# How long a worker thread encodes rows before handing the tokenizer to other requests' rows.
ENCODE_SLICE_S = 0.02
# A body larger than this waits until no smaller request has been in flight for `LARGE_BODY_QUIET_S`, at most
# `LARGE_BODY_WAIT_S` (see `BodyLimit`).
LARGE_BODY_BYTES = 2**20
LARGE_BODY_QUIET_S = 0.01
LARGE_BODY_WAIT_S = 0.1


class ScoringFault(RuntimeError):
    """The model gave no usable score for a row: a fault of the model, not of the request (a 500 naming the row)."""


def characters(value) -> int:
    """The characters of the strings in a JSON value, less the whitespace at their ends (which templates trim); walked
    without recursion."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item.strip())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


@dataclass
class Row:
    """One conversation of a request: its name in messages, the JSON it came as, and how to encode it."""

    where: str
    content: Any
    encode: Callable[[], Any]


class RewardService:
    """Requests → conversations encoded by `ChatEncoder` → the backend → JSON-ready lists."""

    def __init__(self, config: ServeConfig, tokenizer, armorm_config, backend):
        from modeling_armorm.heads import normalize_scores
        from modeling_armorm.scoring import ChatEncoder, model_gating_pattern, objective_names

        self.config = config
        self.tokenizer = tokenizer
        self.objective_names = objective_names(armorm_config)
        self.score_statistics = armorm_config.score_statistics
        if config.normalize:
            normalize_scores(0.0, self.score_statistics)  # a checkpoint without them fails at startup
        # `model_gating_pattern` checks the checkpoint's pattern against the tokenizer's template; it reads `.config`.
        self.encoder = ChatEncoder(
            tokenizer, model_gating_pattern(types.SimpleNamespace(config=armorm_config), tokenizer)
        )
        # A token spells at most as many characters as its vocabulary entry has (byte-level BPE writes each byte of
        # the text as one character; a byte-fallback `<0xE2>` spells one), so a text of more than max_length × this
        # characters has more than max_length tokens, whatever they are: it is refused before it is tokenized.
        self.max_chars_per_token = max(map(len, tokenizer.get_vocab()))
        self.backend = backend

    # Encoding: every path goes through ChatEncoder; a ValueError names the row and becomes a 422.
    def _check_size(self, n: int) -> None:
        if n > self.config.max_request_rows:
            raise ValueError(f"The request holds {n} conversations, more than `--max-request-rows` allows.")

    def _encode_row(self, row: Row):
        limit = self.backend.max_length
        if limit is not None and (chars := characters(row.content)) > limit * self.max_chars_per_token:
            raise ValueError(
                f"{row.where} has {chars} characters, more than the model's {limit} tokens can hold (each of the "
                f"tokenizer's tokens spells at most {self.max_chars_per_token}); shorten it."
            )
        encoded = row.encode()
        if limit is not None and len(encoded) > limit:
            raise ValueError(
                f"{row.where} has {len(encoded)} tokens, more than the model's limit ({limit}); shorten it."
            )
        return encoded

    def _encode_slice(self, rows: list[Row]) -> list:
        """Encode rows in order for about `ENCODE_SLICE_S` (at least one): the tokenizer's lock is held per call, so
        the rows of other requests are encoded in between the slices of a large one."""
        deadline = time.monotonic() + ENCODE_SLICE_S
        encoded = []
        for row in rows:
            encoded.append(self._encode_row(row))
            if time.monotonic() > deadline:
                break
        return encoded

    def conversation_rows(self, conversations: list) -> list[Row]:
        self._check_size(len(conversations))
        return [
            Row(f"conversation {i}", c, functools.partial(self.encoder.encode, c, where=f"conversation {i}"))
            for i, c in enumerate(conversations)
        ]

    def pair_rows(self, prompts: list, completions: list) -> list[Row]:
        from modeling_armorm.trl_reward import encode_prompt_completion

        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; send one of each.")
        self._check_size(len(prompts))
        return [
            Row(
                f"completion {i}",
                [p, c],
                functools.partial(encode_prompt_completion, self.encoder, p, c, f"completion {i}"),
            )
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]

    def response_of(self, query: str, prompt: str, where: str) -> str:
        """The response part of an OpenRLHF query (its prompt + the response, decoded with the special tokens)."""
        pad, eos = self.tokenizer.pad_token, self.tokenizer.eos_token
        while pad and not query.startswith(prompt) and query.startswith(pad):
            query = query[len(pad) :]  # left padding decoded into the text
        if not query.startswith(prompt):
            raise ValueError(
                f"{where}: `query` does not start with its `prompts` entry, so the response cannot be told from the "
                "prompt: send each query as its prompt followed by the response (OpenRLHF does)."
            )
        response = query[len(prompt) :]
        ends = [text for text in (pad, eos, self.encoder.end_of_turn) if text]
        while any(response.endswith(text) for text in ends):  # right padding and the end-of-sequence token
            response = response[: -len(next(text for text in ends if response.endswith(text)))]
        return response

    def _encode_query(self, query: str, prompt: str, where: str):
        # OpenRLHF's prompts are rendered with the generation prompt: h_x is read where the prompt's text ends.
        return self.encoder.encode_rendered(prompt, self.response_of(query, prompt, where), where=where)

    def openrlhf_rows(self, queries: list, prompts: list | None) -> list[Row]:
        if prompts is None:
            raise ValueError(
                "`prompts` is missing: the gating position is read at the end of each prompt, so /get_reward needs "
                "the prompts next to the queries (OpenRLHF sends both)."
            )
        if len(prompts) != len(queries):
            raise ValueError(f"Got {len(queries)} queries but {len(prompts)} prompts; send one prompt per query.")
        self._check_size(len(queries))
        # The query holds its prompt: its characters are the row's.
        return [
            Row(f"query {i}", q, functools.partial(self._encode_query, q, p, f"query {i}"))
            for i, (q, p) in enumerate(zip(queries, prompts))
        ]

    async def score(self, rows: list[Row]) -> dict:
        import torch

        from modeling_armorm import NonFiniteScoreError

        if not rows:
            raise ValueError("The request holds no conversation: send at least one.")
        encoded = []
        while len(encoded) < len(rows):  # in worker threads, a slice at a time (see `_encode_slice`)
            encoded += await asyncio.to_thread(self._encode_slice, rows[len(encoded) :])
        try:
            out = await self.backend.score(encoded)
        except NonFiniteScoreError as error:  # the transformers backend's check, rows of this request
            bad = error.rows or [0]
        else:  # vLLM's scores are checked here
            bad = torch.nonzero(~torch.isfinite(out.score)).flatten().tolist()
        if bad:
            raise ScoringFault(
                f"{rows[bad[0]].where}: the model gave a non-finite score, a fault of the model, not of the request "
                "(a backbone overflow: serve it with `--dtype float32`)."
            )
        return {
            "objective_names": self.objective_names,
            "scores": self.scale(out.score).tolist(),
            "rewards": out.rewards.tolist(),
            "gating_output": out.gating_output.tolist(),
            "coefficients": out.coefficients.tolist(),
        }

    def scale(self, scores):
        """The scores as the server returns them: raw, or with `--normalize` z = (s − mean) / std."""
        from modeling_armorm.heads import normalize_scores

        return normalize_scores(scores, self.score_statistics) if self.config.normalize else scores


class BodyLimit:
    """ASGI middleware: a request body of more than `max_bytes` gets a 413 as soon as it is declared or read that far
    (it is never held whole); a smaller one is passed on as it came.

    A body of more than `LARGE_BODY_BYTES` is read only once no smaller request has been in flight for
    `LARGE_BODY_QUIET_S` (or after `LARGE_BODY_WAIT_S`): reading and parsing it holds the event loop and the GIL for
    milliseconds, which the small requests in flight would wait for; so a stream of large bodies (even refused ones)
    runs when the small requests pause instead of taking turns with them."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.small_in_flight = 0
        self.small_seen = 0.0  # when a smaller request last started or finished (the event loop's clock)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(send)
        large = declared.isdigit() and int(declared) > LARGE_BODY_BYTES
        if large:
            await self.after_small_requests()
        else:
            self.small_in_flight += 1
            self.small_seen = asyncio.get_running_loop().time()
        try:
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client hung up mid-body: nobody to answer
                    return
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    return await self.refuse(send)
                if size > LARGE_BODY_BYTES and not large:  # a chunked body that grew large: it waits from here
                    large = True
                    self.done_small()
                    await self.after_small_requests()
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay():
                return body.pop() if body else await receive()

            await self.app(scope, replay, send)
        finally:
            if not large:
                self.done_small()

    def done_small(self):
        """A request that is not large finished (or its chunked body grew large)."""
        self.small_in_flight -= 1
        self.small_seen = asyncio.get_running_loop().time()

    async def after_small_requests(self):
        """Wait until no smaller request has been in flight for `LARGE_BODY_QUIET_S`, at most `LARGE_BODY_WAIT_S` (a
        steady stream of them leaves no such pause: the large body is then read anyway)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LARGE_BODY_WAIT_S
        while self.small_in_flight or loop.time() - self.small_seen < LARGE_BODY_QUIET_S:
            if loop.time() >= deadline:
                return
            await asyncio.sleep(LARGE_BODY_QUIET_S / 2)

    async def refuse(self, send):
        error = (
            f"The request body has more than {self.max_bytes} bytes, the limit of `--max-body-mb`: send fewer "
            "conversations per request, or raise `--max-body-mb`."
        )
        content = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers + [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": content})


def build_app(service: RewardService):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict

    class ScoreRequest(BaseModel):
        conversations: list[Any] | None = None
        prompts: list[Any] | None = None
        completions: list[Any] | None = None

    class RewardRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # OpenRLHF may send more (`labels`, `metas`, ...): unused
        query: list[str]
        prompts: list[str] | None = None
        labels: list[Any] | None = None

    @asynccontextmanager
    async def lifespan(app):
        await service.backend.start()
        logger.info("armorm serve: %s backend ready for %s", service.backend.name, service.config.model)
        yield
        await service.backend.stop()

    app = FastAPI(title="armorm serve", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=int(service.config.max_body_mb * 2**20))

    @app.exception_handler(ValueError)
    async def bad_request(request: Request, error: ValueError):
        return JSONResponse(status_code=422, content={"error": str(error)})

    @app.exception_handler(ScoringFault)
    async def model_fault(request: Request, error: ScoringFault):
        return JSONResponse(status_code=500, content={"error": str(error)})

    async def hang_up(request: Request) -> None:
        """Returns when the client hangs up: its body was read, so what the server receives next is the disconnect."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def unless_disconnected(request: Request, work):
        """`work`'s answer; when the client hangs up first, `work` is cancelled, and with it the wait for its forward:
        its rows still queued are dropped (`TransformersBackend`) or aborted (vLLM). Waits on both, polls neither."""
        task, gone = asyncio.ensure_future(work), asyncio.ensure_future(hang_up(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                return Response(status_code=499)  # nobody reads it
            return task.result()
        finally:
            task.cancel()
            gone.cancel()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        model = service.config.model
        return {
            "model": Path(model).name
            if Path(model).exists()
            else model,  # the folder's name, never the machine's path
            "backend": service.backend.name,
            "objective_names": service.objective_names,
            "normalize": service.config.normalize,  # whether `scores` are (s − mean) / std
            "score_statistics": service.score_statistics,
            "gating_pattern": list(service.encoder.pattern.token_ids),
            "stats": service.backend.stats,
        }

    @app.post("/score")
    async def score(body: ScoreRequest, request: Request):
        if body.conversations is not None:
            if body.prompts is not None or body.completions is not None:
                raise ValueError("Send either `conversations` or `prompts` + `completions`, not both.")
            rows = service.conversation_rows(body.conversations)
        elif body.prompts is None or body.completions is None:
            raise ValueError("Send `conversations` (message lists) or `prompts` and `completions`.")
        else:
            rows = service.pair_rows(body.prompts, body.completions)
        out = await unless_disconnected(request, service.score(rows))
        # Lists of floats as they are: a `JSONResponse` skips FastAPI's walk over every number (`jsonable_encoder`).
        return JSONResponse(out) if isinstance(out, dict) else out

    @app.post("/get_reward")
    async def get_reward(body: RewardRequest, request: Request):
        out = await unless_disconnected(request, service.score(service.openrlhf_rows(body.query, body.prompts)))
        if not isinstance(out, dict):
            return out
        per_objective = list(zip(*out["rewards"])) if out["rewards"] else []
        return JSONResponse(
            {
                "rewards": out["scores"],
                "scores": out["scores"],
                "extra_logs": {
                    f"armorm/{name}": list(values) for name, values in zip(out["objective_names"], per_objective)
                },
            }
        )

    return app


def build_service(config: ServeConfig) -> RewardService:
    """Load the tokenizer and the config (and, for `transformers`, the model); the backend starts with the app."""
    from transformers import AutoTokenizer

    import modeling_armorm  # noqa: F401  (registers model_type "armorm", which the tokenizer's loading may read)

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    armorm_config = checkpoint_config(config.model)
    if config.backend == "vllm":
        from serving.backends import VllmBackend

        backend = VllmBackend(config.model, config.engine_arguments(config.model, config.dtype))
    else:
        from modeling_armorm import ArmoRMForRewardModeling
        from modeling_armorm.batching import default_max_tokens
        from modeling_armorm.scoring import packs, pad_token_id
        from serving.backends import TransformersBackend

        if json.loads((Path(config.model) / "config.json").read_text()).get("model_type") != "armorm":
            raise ValueError(
                f"{config.model} is in the released RLHFlow layout, which the transformers backend does not load: "
                "convert it (`armorm convert-rlhflow --src-dir SRC --out-dir OUT`) or serve it with `--backend vllm`."
            )
        model = ArmoRMForRewardModeling.from_pretrained(config.model, dtype=torch_dtype(config.dtype))
        device = resolve_device(config.device)
        model = fit_dtype(model, config.dtype, device).to(device).eval()
        # On a CPU, GRPO answers to merged prompts (25 to 100 tokens) padded to the longest of 32 waste a third of it;
        # packed, a longer row pays.
        budget = default_max_tokens(config.max_batch_tokens, device, packs(model))
        backend = TransformersBackend(
            model, pad_token_id(tokenizer), config.max_batch_rows, config.max_wait_ms, budget
        )
    return RewardService(config, tokenizer, armorm_config, backend)


def main(config: ServeConfig | None = None, /, **kwargs) -> None:
    """Serve until interrupted. Pass a `ServeConfig`, or its fields as keywords."""
    import uvicorn

    config = config or ServeConfig(**kwargs)
    app = build_app(build_service(config))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
