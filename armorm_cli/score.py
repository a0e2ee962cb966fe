"""Score conversations with an ArmoRM checkpoint: the score and each objective's reward, as a table or JSON.

    armorm score --model CKPT --input conversations.jsonl
    echo '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]' | armorm score --model CKPT
    armorm score --model CKPT --input conversations.jsonl --json > scores.jsonl

Input (`--input FILE`, or stdin): JSON Lines, each line a `{"messages": [...]}` object or a bare list of messages
that ends with the assistant's answer; a file holding one JSON message list (or one `{"messages": [...]}` object),
even over several lines, is one conversation. Scoring goes through the `reward-scoring` pipeline
(`modeling_armorm.ArmoRMPipeline`): the gating position from the rendering, length-sorted batches, results in input
order. A conversation longer than `--max-length` tokens (or the backbone's limit) is refused with an error naming it,
or with `--truncate-prompt` loses its earliest prompt turns until it fits (as `armorm extract` does). `--json` prints one object per conversation and line: `{"score", "rewards": {objective: r_i}, "gating":
{objective: g_i}}`. `--normalize` prints each score as (s − mean) / std of the checkpoint's reference answers
(`config.score_statistics`); the rewards stay raw.
"""

import json
import os
import sys
from dataclasses import dataclass, field

from transformers import pipeline

from modeling_armorm import ArmoRMPipeline
from modeling_armorm.pipeline import TASK
from modeling_armorm.scoring import validate_messages
from modeling_armorm.settings import (
    BatchSettings,
    DeviceSettings,
    DtypeSettings,
    LengthSettings,
    Location,
    ScaleSettings,
    normalize_locations,
    resolve_device,
    torch_dtype,
)


__all__ = [
    "ARGUMENTS",
    "ScoreConfig",
    "ScoreSettings",
    "format_scores",
    "load_pipeline",
    "main",
    "parse_conversations",
    "read_conversations",
]


@dataclass(kw_only=True)
class ScoreSettings(ScaleSettings, LengthSettings, BatchSettings, DeviceSettings, DtypeSettings):
    """How `armorm score` and `armorm explain` print, with the shared score scale, length policy, batch size, device
    and dtype the model runs with."""

    json: bool = field(default=False, metadata={"help": "Print JSON, one object per conversation and line."})


@dataclass(kw_only=True)
class ScoreConfig(ScoreSettings):
    """`armorm score`: the checkpoint, the conversations and the settings."""

    model: Location = field(metadata={"help": "The ArmoRM checkpoint: a folder or a Hub id."})
    input: Location | None = field(
        default=None,
        metadata={
            "help": 'JSONL file of conversations (`{"messages": [...]}` or a message list per line); default: stdin.'
        },
    )

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)


ARGUMENTS = (ScoreConfig,)


# ----------------------------------------------------------------------------------------------------------------
# Input


FIX = 'write one conversation per line, as {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} or as the bare list'


def _conversation(value, where: str) -> list[dict]:
    if isinstance(value, dict):
        if "messages" not in value:
            raise ValueError(f"{where}: the object has no `messages` (keys: {sorted(value)[:8]}); {FIX}.")
        value = value["messages"]
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a conversation, got {type(value).__name__} {value!r:.60}; {FIX}.")
    return validate_messages(value, where)


def parse_conversations(text: str, source: str = "the input") -> list[list[dict]]:
    """The conversations of `text`: JSON Lines of `{"messages": [...]}` objects or message lists, or one JSON
    conversation (which may span several lines). A bad line raises a `ValueError` naming it and the fix."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    else:
        if isinstance(whole, dict) or (isinstance(whole, list) and whole and isinstance(whole[0], dict)):
            return [_conversation(whole, source)]
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON ({error.msg} at column {error.colno}); {FIX}.") from None
        conversations.append(_conversation(value, where))
    if not conversations:
        raise ValueError(f"{source} holds no conversation; {FIX}.")
    return conversations


def read_conversations(path: str | os.PathLike | None) -> list[list[dict]]:
    """The conversations of the file `path`, or of stdin when `path` is None."""
    if path is not None:
        with open(path, encoding="utf-8") as file:
            return parse_conversations(file.read(), source=os.fspath(path))
    if sys.stdin is None or sys.stdin.closed or sys.stdin.isatty():
        raise ValueError("No `--input` and nothing on stdin: pass `--input FILE` or pipe the conversations in.")
    return parse_conversations(sys.stdin.read(), source="stdin")


# ----------------------------------------------------------------------------------------------------------------
# The model and the output


def load_pipeline(config: ScoreSettings) -> ArmoRMPipeline:
    """The `reward-scoring` pipeline of `config.model` with the run settings."""
    return pipeline(
        TASK,
        model=config.model,
        dtype=torch_dtype(config.dtype),
        device=resolve_device(config.device),
        batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens,
        max_length=config.max_length,
        truncate_prompt=config.truncate_prompt,
        normalize=config.normalize,
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def format_scores(results: list[dict]) -> str:
    """One row per conversation: its index, score and each objective's reward r_i."""
    names = list(results[0]["rewards"]) if results else []
    rows = [
        [str(i), f"{r['score']:+.4f}", *(f"{r['rewards'][name]:.4f}" for name in names)] for i, r in enumerate(results)
    ]
    return _table(["#", "score", *names], rows)


def main(config: ScoreConfig | None = None, /, **kwargs) -> list[dict]:
    """Score the conversations of `config.input` (or stdin) and print them; returns the pipeline's results."""
    config = config or ScoreConfig(**kwargs)
    conversations = read_conversations(config.input)
    results = load_pipeline(config).score(conversations)
    if config.json:
        for result in results:
            print(json.dumps(result, allow_nan=False))  # never `NaN` (not JSON): the scoring path raises first
    else:
        print(format_scores(results))
    return results
