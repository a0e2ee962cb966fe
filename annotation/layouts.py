# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Read a prompt and its candidate answers from the layouts people publish, for `armorm annotate`.

The layouts (`LAYOUTS`), and the columns each reads:

* `all_generated_responses`: `prompt` (a string or a message list) or `messages`, and `all_generated_responses`,
  a list of answers (SimPO's on-policy data, e.g. princeton-nlp/llama3-ultrafeedback-armorm).
* `completions`: `prompt` or `messages`, and `completions`, a list of answers.
* `ultrafeedback`: `instruction` (a string) and `completions`, a list of dicts whose `response` is the answer
  (openbmb/UltraFeedback; the other keys, `custom_system_prompt` included, are not read).
* `prompt_completion`: TRL's prompt-completion rows, `prompt` and `completion`, each a string or a message list (the
  conversational layout: the prompt a message list, the completion `[assistant message]`). Rows with equal prompt
  messages make one group of candidates, the groups in the order their prompts first appear, the answers in row
  order.
* `chosen_rejected`: preference pairs, re-annotated: TRL's explicit prompt (`prompt` + `chosen` + `rejected`) or
  implicit prompt (`chosen` and `rejected` whole conversations whose common leading turns are the prompt), read as
  `armorm_io.data.pair_conversations` reads every pair of the package. A row is a group of its 2 answers.

A table's layout is the first of `all_generated_responses`, `ultrafeedback`, `completions`, `prompt_completion`,
`chosen_rejected` whose columns it has (`detect_layout`): SimPO's data also holds `chosen` / `rejected`, and
UltraFeedback's `completions` are dicts, not answers.

A prompt string is one user turn. A prompt given as messages ends with the user's turn; in a `messages` column that
ends with the assistant's turn (a whole conversation), the prompt is the messages up to the last user turn, and the
turns after it are not read. An answer is a string, or a message list holding one assistant message (its content).
Messages are checked by `modeling_armorm.scoring.validate_messages`, the one rule of the scoring path: an empty
answer is a candidate (it is scored, as the scoring path scores it), an empty prompt is not.

A row that cannot be read (no candidates, a candidate that is not text, a prompt that is empty or not text) is
returned as `Skipped` with the reason, and with it every candidate of that row: a row's candidates are annotated
together or not at all, so that each scored row keeps its candidates in their order. One bad row never stops a read.
"""

from dataclasses import dataclass

import datasets

from armorm_io.data import pair_conversations
from modeling_armorm.scoring import validate_messages


__all__ = ["LAYOUTS", "Candidates", "Skipped", "detect_layout", "read_candidates"]

LAYOUTS = ("all_generated_responses", "completions", "ultrafeedback", "prompt_completion", "chosen_rejected")
# The columns of each layout: every tuple names alternatives, of which the first present is read.
COLUMNS = {
    "all_generated_responses": (("prompt", "messages"), ("all_generated_responses",)),
    "completions": (("prompt", "messages"), ("completions",)),
    "ultrafeedback": (("instruction",), ("completions",)),
    "prompt_completion": (("prompt",), ("completion",)),
    "chosen_rejected": (("chosen",), ("rejected",)),
}
DESCRIPTIONS = {
    "all_generated_responses": "`prompt` or `messages` + `all_generated_responses` (a list of answers; SimPO)",
    "completions": "`prompt` or `messages` + `completions` (a list of answers: strings or [assistant message])",
    "ultrafeedback": "`instruction` + `completions` (a list of dicts with a `response`; openbmb/UltraFeedback)",
    "prompt_completion": "`prompt` + `completion` (strings or message lists; TRL prompt-completion, grouped by prompt)",
    "chosen_rejected": "`chosen` + `rejected`, with or without `prompt` (TRL preference pairs, re-annotated)",
}
# `ultrafeedback` before `completions`: a table with both `instruction` and `prompt` holds UltraFeedback's dicts.
_DETECTION_ORDER = ("all_generated_responses", "ultrafeedback", "completions", "prompt_completion", "chosen_rejected")
_BATCH_SIZE = 1024  # rows decoded per `datasets` batch


@dataclass
class Candidates:
    """One prompt and its candidate answers, read from one row or, for `prompt_completion`, from several.

    `prompt`: the chat messages (`{"role", "content"}`), the last one a user turn. `answers`: the candidate answers
    as text. `rows`: the input row (0-based) each answer came from, one entry per answer.
    """

    prompt: list[dict]
    answers: list[str]
    rows: list[int]


@dataclass
class Skipped:
    """An input row (0-based) that cannot be annotated, and why, naming the column and the fix."""

    row: int
    reason: str


def detect_layout(columns: list[str]) -> str:
    """The layout of a table with `columns`: the first of `_DETECTION_ORDER` whose columns it has."""
    for layout in _DETECTION_ORDER:
        if not _missing(layout, columns):
            return layout
    layouts = "\n".join(f"  * {layout}: {DESCRIPTIONS[layout]}" for layout in LAYOUTS)
    raise ValueError(
        f"No annotation layout fits the columns {list(columns)}. The layouts are:\n{layouts}\n"
        "Rename the columns (`Dataset.rename_column`) to one of these."
    )


def read_candidates(table: datasets.Dataset, layout: str | None = None) -> tuple[list[Candidates], list[Skipped]]:
    """Every prompt of `table` with its candidate answers, and the rows that cannot be read.

    Args:
        table: the input rows.
        layout: one of `LAYOUTS`; by default, the one `detect_layout` finds from the columns.
    """
    columns = list(table.column_names)
    if layout is None:
        layout = detect_layout(columns)
    elif layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}.")
    missing = _missing(layout, columns)
    if missing:
        raise ValueError(
            f"The `{layout}` layout reads {DESCRIPTIONS[layout]}, but the table has no {' and no '.join(missing)} "
            f"(its columns: {columns}): rename the columns, or leave `layout` unset to detect it."
        )
    read = [next(c for c in alternatives if c in columns) for alternatives in COLUMNS[layout]]
    if layout == "chosen_rejected" and "prompt" in columns:
        read.append("prompt")

    groups: dict[tuple, Candidates] = {}  # prompt_completion: one group per distinct prompt, in order
    candidates, skipped = [], []
    for i, row in _rows(table, read):
        try:
            prompt, answers = _read_row(layout, row, read)
        except ValueError as error:
            skipped.append(Skipped(i, str(error)))
            continue
        if layout == "prompt_completion":
            key = tuple((message["role"], message["content"]) for message in prompt)
            if key not in groups:
                groups[key] = Candidates(prompt, [], [])
                candidates.append(groups[key])
            groups[key].answers += answers
            groups[key].rows += [i] * len(answers)
        else:
            candidates.append(Candidates(prompt, answers, [i] * len(answers)))
    return candidates, skipped


def _missing(layout: str, columns: list[str]) -> list[str]:
    """The columns of `layout` that `columns` lacks, as "`a` or `b`" for alternatives."""
    return [
        " or ".join(f"`{c}`" for c in alternatives)
        for alternatives in COLUMNS[layout]
        if not any(c in columns for c in alternatives)
    ]


def _rows(table: datasets.Dataset, columns: list[str]):
    """(row index, row) pairs, decoding only `columns`, batch by batch (row access one by one is slow)."""
    index = 0
    for batch in table.select_columns(columns).iter(batch_size=_BATCH_SIZE):
        for values in zip(*(batch[column] for column in columns)):
            yield index, dict(zip(columns, values))
            index += 1


def _read_row(layout: str, row: dict, columns: list[str]) -> tuple[list[dict], list[str]]:
    """A row's prompt and answers; a `ValueError` naming the column and the fix when it cannot be annotated."""
    if layout == "chosen_rejected":
        chosen, rejected = pair_conversations(row)
        prompt = _check_prompt(chosen[:-1], "the prompt that `chosen` and `rejected` share")
        return prompt, [chosen[-1]["content"], rejected[-1]["content"]]
    prompt_column, answer_column = columns
    prompt = _prompt(row[prompt_column], prompt_column)
    if layout == "prompt_completion":
        return prompt, [_answer(row[answer_column], f"`{answer_column}`", prompt)]
    values = row[answer_column]
    if not isinstance(values, list) or not values:
        found = "an empty list" if isinstance(values, list) else f"{values!r:.60}"
        raise ValueError(
            f"`{answer_column}` holds no candidates ({found}): give the row a list of answers, or drop it."
        )
    if layout == "ultrafeedback":
        values = [_response(value, f"candidate {j} of `{answer_column}`") for j, value in enumerate(values)]
    return prompt, [_answer(value, f"candidate {j} of `{answer_column}`", prompt) for j, value in enumerate(values)]


def _prompt(value, column: str) -> list[dict]:
    """A prompt cell as messages that end with the user's turn (see the module docstring)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    elif not isinstance(value, list):
        raise ValueError(
            f"`{column}` is {value!r:.60}, not a string or a list of messages: give each row its prompt as text."
        )
    if not value:
        raise ValueError(f"`{column}` is an empty list: give each row its prompt's messages.")
    if column == "messages" and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        users = [j for j, message in enumerate(value) if isinstance(message, dict) and message.get("role") == "user"]
        value = value[: users[-1] + 1] if users else value
    # Checked as the conversation it opens: the placeholder answer stands for any candidate.
    return _check_prompt(
        validate_messages([*value, {"role": "assistant", "content": ""}], f"`{column}`")[:-1], f"`{column}`"
    )


def _check_prompt(prompt: list[dict], where: str) -> list[dict]:
    """`prompt`, which must end with the user's turn and hold some text."""
    if prompt[-1]["role"] != "user":
        raise ValueError(
            f"{where} ends with the {prompt[-1]['role']}'s turn, not the user's: a prompt ends with the user's turn "
            "that the candidates answer; drop the trailing turns."
        )
    if not any(message["content"].strip() for message in prompt):
        raise ValueError(f"{where} is empty: give each row its prompt's text, or drop the row.")
    return prompt


def _response(value, where: str):
    """An UltraFeedback completion's `response`."""
    if not isinstance(value, dict):
        raise ValueError(
            f"{where} is {value!r:.60}, not a dict with a `response` (UltraFeedback's layout): fix the row, or give "
            "the answers as strings in the `completions` layout."
        )
    if not isinstance(value.get("response"), str):
        raise ValueError(
            f"{where} has no text `response` (got {value.get('response')!r:.60}): fill in the answer, or drop the "
            "completion."
        )
    return value["response"]


def _answer(value, where: str, prompt: list[dict]) -> str:
    """A candidate (a string, or a list of one assistant message) as text, checked in the conversation it ends."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(
                f"{where} holds {len(value)} messages, not one answer: a candidate is a string or one assistant "
                "message; join a multi-turn answer into one message, or drop it."
            )
        message = value[0]
        if not isinstance(message, dict) or message.get("role") != "assistant":
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(
                f"{where} is a {role!r} message, not the assistant's answer: give the answer as "
                '[{"role": "assistant", "content": ...}] or as a string.'
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"{where} has {message.get('content')!r:.60} as content, not text: fill in the answer's text, or "
                "drop it."
            )
    elif isinstance(value, str):
        message = {"role": "assistant", "content": value}
    else:
        raise ValueError(
            f"{where} is {value!r:.60}, not text: give every answer as a string (or as [assistant message]), or "
            "drop it from the row."
        )
    return validate_messages([*prompt, message], f"the conversation of {where}")[-1]["content"]
