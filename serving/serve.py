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
* `GET /info` (model, backend, objectives, counters) and `GET /health`.

Backends: `transformers` (the default; needs no vLLM) merges concurrent requests into shared forwards;
`vllm` runs vLLM's async engine with the ArmoRM plugin (install vLLM; its engine settings go in `--vllm-engine-args`).
Every conversation is encoded here, by the package's one scoring path (`modeling_armorm.scoring.ChatEncoder`).
"""

import asyncio
import json
import logging
import types
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modeling_armorm.settings import (
    DeviceSettings,
    DtypeSettings,
    Location,
    normalize_locations,
    resolve_device,
    torch_dtype,
)


logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")


@dataclass(kw_only=True)
class ServeSettings(DeviceSettings, DtypeSettings):
    """The knobs of `armorm serve`, with the shared device (the transformers backend's) and dtype (both backends')."""

    backend: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={"help": "`transformers` (this process, dynamic batching) or `vllm` (vLLM's async engine)."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (`0.0.0.0`: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    max_batch_rows: int = field(
        default=32,
        metadata={"help": "Transformers backend: most conversations per forward (concurrent requests merge)."},
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "Transformers backend: how long a waiting request waits for others to join it."}
    )
    max_request_rows: int = field(
        default=8192, metadata={"help": "Most conversations one request may hold; a larger one gets a 422."}
    )
    vllm_engine_args: str = field(
        default="{}",
        metadata={
            "help": 'vLLM backend: vLLM engine arguments as JSON, e.g. `{"tensor_parallel_size": 2, '
            '"gpu_memory_utilization": 0.5}` (`dtype` comes from `--dtype`).'
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
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {self.backend!r}.")
        try:
            engine_args = json.loads(self.vllm_engine_args)
        except json.JSONDecodeError as error:
            raise ValueError(f"`vllm_engine_args` is not JSON ({error}): give an object such as '{{}}'.") from None
        if not isinstance(engine_args, dict):
            raise ValueError(f"`vllm_engine_args` must be a JSON object, got {self.vllm_engine_args!r}.")
        taken = sorted({"model", "runner"} & set(engine_args))
        if taken:
            raise ValueError(
                f"`vllm_engine_args` sets {taken}, which `armorm serve` sets itself (`--model`); drop them."
            )
        for name in ("max_batch_rows", "max_request_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")


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


class RewardService:
    """Requests → conversations encoded by `ChatEncoder` → the backend → JSON-ready lists."""

    def __init__(self, config: ServeConfig, tokenizer, armorm_config, backend):
        from modeling_armorm.scoring import ChatEncoder, model_gating_pattern, objective_names

        self.config = config
        self.tokenizer = tokenizer
        self.objective_names = objective_names(armorm_config)
        # `model_gating_pattern` checks the checkpoint's pattern against the tokenizer's template; it reads `.config`.
        self.encoder = ChatEncoder(
            tokenizer, model_gating_pattern(types.SimpleNamespace(config=armorm_config), tokenizer)
        )
        self.backend = backend

    # Encoding: every path goes through ChatEncoder; a ValueError names the row and becomes a 422.
    def _checked(self, encoded: list) -> list:
        if not encoded:
            raise ValueError("The request holds no conversation: send at least one.")
        limit = self.backend.max_length
        for i, row in enumerate(encoded):
            if limit is not None and len(row) > limit:
                raise ValueError(
                    f"Conversation {i} has {len(row)} tokens, more than the model's limit ({limit}); shorten it."
                )
        return encoded

    def _check_size(self, n: int) -> None:
        if n > self.config.max_request_rows:
            raise ValueError(f"The request holds {n} conversations, more than `--max-request-rows` allows.")

    def encode_conversations(self, conversations: list) -> list:
        self._check_size(len(conversations))
        return self._checked([self.encoder.encode(c, where=f"conversation {i}") for i, c in enumerate(conversations)])

    def encode_pairs(self, prompts: list, completions: list) -> list:
        from modeling_armorm.trl_reward import encode_prompt_completion

        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; send one of each.")
        self._check_size(len(prompts))
        return self._checked(
            [
                encode_prompt_completion(self.encoder, p, c, where=f"completion {i}")
                for i, (p, c) in enumerate(zip(prompts, completions))
            ]
        )

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

    def encode_openrlhf(self, queries: list, prompts: list | None) -> list:
        from modeling_armorm.trl_reward import encode_prompt_completion

        if prompts is None:
            raise ValueError(
                "`prompts` is missing: the gating position is read at the end of each prompt, so /get_reward needs "
                "the prompts next to the queries (OpenRLHF sends both)."
            )
        if len(prompts) != len(queries):
            raise ValueError(f"Got {len(queries)} queries but {len(prompts)} prompts; send one prompt per query.")
        self._check_size(len(queries))
        encoded = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            response = self.response_of(query, prompt, where=f"query {i}")
            encoded.append(encode_prompt_completion(self.encoder, prompt, response, where=f"query {i}"))
        return self._checked(encoded)

    async def score(self, encode, *args) -> dict:
        # Encoding runs in a worker thread; the encoder holds its tokenizer's lock (`modeling_armorm.scoring`).
        encoded = await asyncio.to_thread(encode, *args)
        out = await self.backend.score(encoded)
        return {
            "objective_names": self.objective_names,
            "scores": out.score.tolist(),
            "rewards": out.rewards.tolist(),
            "gating_output": out.gating_output.tolist(),
            "coefficients": out.coefficients.tolist(),
        }


def build_app(service: RewardService):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
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

    @app.exception_handler(ValueError)
    async def bad_request(request: Request, error: ValueError):
        return JSONResponse(status_code=422, content={"error": str(error)})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {
            "model": service.config.model,
            "backend": service.backend.name,
            "objective_names": service.objective_names,
            "gating_pattern": list(service.encoder.pattern.token_ids),
            "stats": service.backend.stats,
        }

    @app.post("/score")
    async def score(request: ScoreRequest):
        if request.conversations is not None:
            if request.prompts is not None or request.completions is not None:
                raise ValueError("Send either `conversations` or `prompts` + `completions`, not both.")
            return await service.score(service.encode_conversations, request.conversations)
        if request.prompts is None or request.completions is None:
            raise ValueError("Send `conversations` (message lists) or `prompts` and `completions`.")
        return await service.score(service.encode_pairs, request.prompts, request.completions)

    @app.post("/get_reward")
    async def get_reward(request: RewardRequest):
        out = await service.score(service.encode_openrlhf, request.query, request.prompts)
        per_objective = list(zip(*out["rewards"])) if out["rewards"] else []
        return {
            "rewards": out["scores"],
            "scores": out["scores"],
            "extra_logs": {
                f"armorm/{name}": list(values) for name, values in zip(out["objective_names"], per_objective)
            },
        }

    return app


def build_service(config: ServeConfig) -> RewardService:
    """Load the tokenizer and the config (and, for `transformers`, the model); the backend starts with the app."""
    from transformers import AutoTokenizer

    import modeling_armorm  # noqa: F401  (registers model_type "armorm", which the tokenizer's loading may read)

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    armorm_config = checkpoint_config(config.model)
    if config.backend == "vllm":
        from serving.backends import VllmBackend

        engine_args = json.loads(config.vllm_engine_args)
        if config.dtype == "auto":
            # vLLM's own "auto" runs a float32 checkpoint in half precision; here "auto" means as saved, as it does
            # for the transformers backend.
            saved = json.loads((Path(config.model) / "config.json").read_text())
            engine_args.setdefault("dtype", saved.get("dtype") or saved.get("torch_dtype") or "auto")
        else:
            engine_args.setdefault("dtype", config.dtype)
        backend = VllmBackend(config.model, engine_args)
    else:
        from modeling_armorm import ArmoRMForRewardModeling
        from modeling_armorm.scoring import pad_token_id
        from serving.backends import TransformersBackend

        if json.loads((Path(config.model) / "config.json").read_text()).get("model_type") != "armorm":
            raise ValueError(
                f"{config.model} is in the released RLHFlow layout, which the transformers backend does not load: "
                "convert it (`armorm convert-rlhflow --src-dir SRC --out-dir OUT`) or serve it with `--backend vllm`."
            )
        model = ArmoRMForRewardModeling.from_pretrained(config.model, dtype=torch_dtype(config.dtype))
        model = model.to(resolve_device(config.device)).eval()
        backend = TransformersBackend(model, pad_token_id(tokenizer), config.max_batch_rows, config.max_wait_ms)
    return RewardService(config, tokenizer, armorm_config, backend)


def main(config: ServeConfig | None = None, /, **kwargs) -> None:
    """Serve until interrupted. Pass a `ServeConfig`, or its fields as keywords."""
    import uvicorn

    config = config or ServeConfig(**kwargs)
    app = build_app(build_service(config))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
