"""Read every data layout this package accepts into chat message lists: rated responses and preference pairs.

Data comes through `datasets`: a Hub id (with `name` and `split`), a local data folder, or a local
json/jsonl/json.gz, parquet or csv file. Accepted layouts:

* ratings: `messages` (a conversation ending with the rated assistant turn) + one numeric column per objective
  (null or absent = missing, NaN in `labels`); or TRL's prompt-completion form, `prompt` + `completion`
  (message lists or strings) + objective columns.
* pairs: `chosen` / `rejected` message lists sharing every turn but the last (RLHFlow, TRL conversational
  implicit prompt); `prompt` + `chosen` / `rejected`, as message lists (TRL conversational explicit prompt) or
  strings (RewardBench, TRL standard: one user turn and the answer); Anthropic HH transcripts
  ("\\n\\nHuman: …\\n\\nAssistant: …") in `chosen` / `rejected`. A `subset` column is kept (RewardBench), else
  `source`.

A malformed row is skipped and recorded in `skipped` with its source index and the reason, so that a long
extraction never stops halfway and never drops a row silently. A file in no accepted layout raises one error.
"""

import hashlib
import json
import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from armorm_io.files import Fingerprint, check_location, file_sha256, hub_unreachable
from modeling_armorm.scoring import ROLES, validate_messages


logger = logging.getLogger(__name__)

# The `datasets` builder of each local file extension (compressed files are read through their inner extension).
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Numeric columns that number rows rather than rate them: never a default objective.
ID_COLUMN = re.compile(r"(^|[_\-])(id|idx|index)$", re.IGNORECASE)
# Columns that may hold a pair's own ratings (UltraFeedback): equal ratings make the pair a tie.
SCORE_COLUMNS = ("score_chosen", "score_rejected", "metadata")
# Columns that hold the conversation or the row's group, never an objective.
TEXT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected", "subset", "source")
RATING_LAYOUTS = (
    "`messages` (a message list ending with the assistant turn) + numeric objective columns",
    "`prompt` + `completion` (message lists or strings, TRL prompt-completion) + numeric objective columns",
)
PAIR_LAYOUTS = (
    "`chosen` + `rejected` message lists that share every turn but the last (RLHFlow, TRL implicit prompt)",
    "`chosen` + `rejected` Anthropic HH transcripts ('\\n\\nHuman: …\\n\\nAssistant: …')",
    "`prompt` + `chosen` + `rejected`, as message lists (TRL explicit prompt) or strings (RewardBench, TRL standard)",
)
BATCH_SIZE = 1024  # rows decoded per `datasets` batch: big enough to amortise Arrow decoding, small in memory
# `datasets` types a json column of mixed types (numbers and strings) as `Json`; older releases have no such type.
_JSON_FEATURE = getattr(datasets, "Json", ())
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_PROMPT_START = "\n\nHuman:"
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class RatingRows:
    """Rated responses: `messages[i]` ends with the assistant turn that `labels[i]` rates.

    `labels` is (N, k) float32 in the order of `objectives`, NaN where a label is missing; `index[i]` is the
    row's position in the source split; `skipped` lists `{"index": i, "reason": str}` for every row left out.
    """

    messages: list[list[dict]]
    labels: np.ndarray
    objectives: list[str]
    index: list[int]
    skipped: list[dict] = field(default_factory=list)
    layout: str = "messages"

    def __len__(self) -> int:
        return len(self.messages)


@dataclass
class PairRows:
    """Preference pairs as two full conversations that share every turn but the last (the prompt).

    `subset[i]` is the row's `subset` (RewardBench) or `source` value, None without either column.
    """

    chosen: list[list[dict]]
    rejected: list[list[dict]]
    subset: list[str | None]
    index: list[int]
    skipped: list[dict] = field(default_factory=list)
    layout: str = "implicit prompt"

    def __len__(self) -> int:
        return len(self.chosen)


def load_table(data: str | os.PathLike, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """One split of `data` as a `datasets.Dataset`: a local file (builder picked by extension), a local data
    folder, or a Hub dataset id (`name` = its configuration)."""
    data = os.fspath(data)
    if os.path.isfile(data):
        base = os.path.basename(data).lower()
        for compression in COMPRESSIONS:
            base = base.removesuffix(compression)
        builder = BUILDERS.get(os.path.splitext(base)[1])
        if builder is None:
            raise ValueError(
                f"Cannot read {data!r}: unknown file type. Give a {', '.join(BUILDERS)} file (optionally "
                f"compressed: {', '.join(COMPRESSIONS)}), a data folder, or a Hub dataset id."
            )
        if os.path.getsize(data) == 0:
            raise ValueError(f"{data!r} is empty: no rows to read.")
        # A local file has one split; name it after the requested one so that slices such as `train[:100]` work.
        split_name = split.split("[", 1)[0]
        try:
            table = datasets.load_dataset(builder, data_files={split_name: data}, split=split)
        except StopIteration as error:  # `datasets` finds no row to infer the schema from
            raise ValueError(f"{data!r} holds no rows: nothing to read.") from error
        return _non_empty(table, data)
    if os.path.isdir(data):
        return _non_empty(datasets.load_dataset(data, name, split=split), data)
    if os.path.splitext(data)[1].lower() in (*BUILDERS, *COMPRESSIONS) or data.startswith(("/", ".")):
        raise FileNotFoundError(f"No such data file: {data!r}. Check the path (an absolute path is safest).")
    check_location(data, "The data")
    try:
        table = datasets.load_dataset(data, name, split=split)
    except (OSError, ConnectionError, ValueError) as error:  # offline, unknown id, no access
        raise hub_unreachable(data, "The data", error) from error
    return _non_empty(table, data)


def _non_empty(table: datasets.Dataset, data: str) -> datasets.Dataset:
    if len(table) == 0:
        raise ValueError(f"{data!r} holds no rows: nothing to read. Check the file (or the split's slice).")
    return table


def data_fingerprint(data: str | os.PathLike) -> Fingerprint:
    """What identifies the data's content: the sha256 of a local file, of every file of a local folder, or None for a
    Hub dataset id (`datasets` resolves its revision itself)."""
    data = os.fspath(data)
    if os.path.isfile(data):
        return Fingerprint(data, file_sha256(data))
    if os.path.isdir(data):
        files = sorted(path for path in Path(data).rglob("*") if path.is_file() and not path.name.startswith("."))
        listing = [[path.relative_to(data).as_posix(), file_sha256(path)] for path in files]
        return Fingerprint(data, hashlib.sha256(json.dumps(listing).encode()).hexdigest())
    return Fingerprint(data, None)


def parse_hh_transcript(text: str) -> list[dict]:
    """Split an Anthropic HH transcript ("\\n\\nHuman: …\\n\\nAssistant: …") into user and assistant messages.

    Contents are stripped; an empty turn (such as the trailing "\\n\\nAssistant:" of a prompt) is kept empty for
    the caller to judge. Raises `ValueError` when the text does not start with a "\\n\\nHuman:" turn.
    """
    if not isinstance(text, str):
        raise ValueError(f"an HH transcript must be a string, got {type(text).__name__}")
    # re.split with one capturing group gives [text before the first marker, role, content, role, content, ...].
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip() or parts[1] != "Human":
        raise ValueError(
            "not an Anthropic HH transcript: it must start with '\\n\\nHuman:' and hold '\\n\\nAssistant:' turns, "
            f"got {text[:60]!r}"
        )
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def load_ratings(
    data: str | os.PathLike, split: str = "train", objectives: list[str] | None = None, name: str | None = None
) -> RatingRows:
    """Read rated responses: conversations and their (N, k) labels, NaN where missing.

    Args:
        data: a Hub dataset id, a local data folder or a json/jsonl/json.gz/parquet/csv file.
        split: the split to read (a local file's only split takes this name; slices like `train[:100]` work).
        objectives: the label columns, in order; default every numeric column but the conversation and ids
            (`id`, `*_id`, `index`, `*_index`, ...), in the data's column order.
        name: the Hub dataset configuration.
    """
    data = os.fspath(data)
    table = load_table(data, split, name)
    columns = list(table.column_names)
    if "messages" in columns:
        layout, conversation_columns = "messages", ["messages"]
    elif "prompt" in columns and "completion" in columns:
        layout, conversation_columns = "prompt-completion", ["prompt", "completion"]
    else:
        raise _layout_error(data, split, columns, "ratings", RATING_LAYOUTS)
    objectives = _objective_columns(table, data) if objectives is None else list(objectives)
    missing = [column for column in objectives if column not in columns]
    if missing:
        raise ValueError(f"{data!r} has no objective column {missing}; its columns are {columns}.")
    if not objectives:
        raise ValueError(
            f"{data!r} has no numeric objective column (columns: {columns}). Name them with `objectives=`."
        )

    messages, labels, index, skipped = [], [], [], []
    for i, row in _iter_rows(table, conversation_columns + objectives, f"Reading ratings from {data}"):
        try:
            if layout == "messages":
                conversation = _messages(row["messages"], "messages", as_turns=None)
            else:
                conversation = _messages(row["prompt"], "prompt", as_turns=_prompt_turns) + _messages(
                    row["completion"], "completion", as_turns=_assistant_turn
                )
            _check_conversation(conversation, "the conversation")
            values = [_label(row[column], column) for column in objectives]
        except ValueError as error:
            skipped.append({"index": i, "reason": str(error)})
            continue
        messages.append(conversation)
        labels.append(values)
        index.append(i)
    _log_skipped(skipped, len(table), data)
    labels = np.asarray(labels, dtype=np.float32).reshape(len(labels), len(objectives))
    return RatingRows(messages, labels, objectives, index, skipped, layout)


def load_pairs(data: str | os.PathLike, split: str = "train", name: str | None = None) -> PairRows:
    """Read preference pairs as full `chosen` / `rejected` conversations that share their prompt.

    Args:
        data: a Hub dataset id, a local data folder or a json/jsonl/json.gz/parquet/csv file.
        split: the split to read (a local file's only split takes this name; slices like `train[:100]` work).
        name: the Hub dataset configuration.
    """
    data = os.fspath(data)
    table = load_table(data, split, name)
    columns = list(table.column_names)
    if "chosen" not in columns or "rejected" not in columns:
        raise _layout_error(data, split, columns, "pairs", PAIR_LAYOUTS)
    explicit = "prompt" in columns
    group = "subset" if "subset" in columns else "source" if "source" in columns else None
    read = ["chosen", "rejected"] + (["prompt"] if explicit else []) + ([group] if group else [])
    read += [column for column in SCORE_COLUMNS if column in columns]

    chosen_rows, rejected_rows, subset, index, skipped = [], [], [], [], []
    for i, row in _iter_rows(table, read, f"Reading pairs from {data}"):
        try:
            if explicit:
                prompt = _messages(row["prompt"], "prompt", as_turns=_prompt_turns)
                # Answers to an HH transcript prompt start with the space after "Assistant:": strip them as
                # `parse_hh_transcript` strips every turn.
                hh = isinstance(row["prompt"], str) and row["prompt"].startswith(_HH_PROMPT_START)
                as_answer = _stripped_assistant_turn if hh else _assistant_turn
                chosen = prompt + _messages(row["chosen"], "chosen", as_turns=as_answer)
                rejected = prompt + _messages(row["rejected"], "rejected", as_turns=as_answer)
            else:
                chosen = _messages(row["chosen"], "chosen", as_turns=parse_hh_transcript)
                rejected = _messages(row["rejected"], "rejected", as_turns=parse_hh_transcript)
            _check_conversation(chosen, "`chosen`")
            _check_conversation(rejected, "`rejected`")
            if chosen[:-1] != rejected[:-1]:
                raise ValueError(
                    "`chosen` and `rejected` have different prompts (every turn but the last must be the same)"
                )
            if chosen[-1]["content"] == rejected[-1]["content"]:
                raise ValueError("`chosen` and `rejected` are the same answer: the pair states no preference")
            _check_not_a_tie(row)
        except ValueError as error:
            skipped.append({"index": i, "reason": str(error)})
            continue
        chosen_rows.append(chosen)
        rejected_rows.append(rejected)
        subset.append(None if group is None or row[group] is None else str(row[group]))
        index.append(i)
    _log_skipped(skipped, len(table), data)
    layout = "explicit prompt" if explicit else "implicit prompt"
    return PairRows(chosen_rows, rejected_rows, subset, index, skipped, layout)


def _check_not_a_tie(row: dict) -> None:
    """A pair whose own ratings are equal (UltraFeedback's `score_chosen == score_rejected`, at the top level or in
    a `metadata` column) is a tie, not a preference: training or evaluating on it would read noise as a label."""
    scores = dict(row.get("metadata") or {}) if isinstance(row.get("metadata"), dict) else {}
    scores.update({key: row[key] for key in ("score_chosen", "score_rejected") if row.get(key) is not None})
    chosen, rejected = scores.get("score_chosen"), scores.get("score_rejected")
    if _is_number(chosen) and _is_number(rejected) and chosen == rejected:
        raise ValueError(f"a tie: score_chosen == score_rejected ({chosen:g}), not a preference")


def _iter_rows(table: datasets.Dataset, columns: list[str], desc: str) -> Iterator[tuple[int, dict]]:
    """(source index, row) pairs, decoding only `columns`, batch by batch (row access one by one is slow)."""
    table = table.select_columns(columns)
    index = 0
    with tqdm(total=len(table), desc=desc, unit="row") as progress:
        for batch in table.iter(batch_size=BATCH_SIZE):
            for values in zip(*(batch[column] for column in columns)):
                yield index, dict(zip(columns, values))
                index += 1
            progress.update(len(batch[columns[0]]))


def _objective_columns(table: datasets.Dataset, data: str) -> list[str]:
    """Every column holding numbers, but the conversation, row ids and all-null columns, in order of first use."""
    objectives = []
    for column, feature in table.features.items():
        if column in TEXT_COLUMNS or ID_COLUMN.search(column):
            continue
        if isinstance(feature, datasets.Value):
            if feature.dtype == "bool" or feature.dtype.startswith(("int", "uint", "float")):
                objectives.append(column)
            elif feature.dtype == "null":
                logger.warning("%s: column `%s` is null in every row; not read as an objective.", data, column)
        elif isinstance(feature, _JSON_FEATURE) and any(_is_number(value) for value in table[column]):
            # Mixed types (numbers and strings in one json column): an objective whose odd rows get skipped.
            objectives.append(column)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            # A csv column with one bad cell is read as strings: still an objective when most cells are numbers,
            # so that one cell skips its row instead of dropping the whole objective.
            cells = [value for value in table[column] if value not in (None, "")]
            if cells and sum(_parses_as_number(value) for value in cells) * 2 >= len(cells):
                objectives.append(column)
    # In the order the rows name them: a json file's column order comes from pyarrow's schema unification, which
    # depends on how the file was split into blocks (and on threads), not on the data.
    first_rated = {
        column: next((i for i, v in enumerate(table[column]) if v is not None), len(table)) for column in objectives
    }
    return sorted(objectives, key=lambda column: first_rated[column])


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Labels are stored as float32: a larger magnitude would become ±inf there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _label(value, column: str) -> float:
    """A label as a float: null → NaN (missing), booleans → 0/1, a string holding a number (a csv cell) → that
    number. Anything else is an error that skips the row: a string that is not a number, NaN or ±Infinity (JSON
    `NaN` is not "missing": that is null), or a magnitude float32 cannot hold."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(
                f"objective `{column}` is {value!r}, not a number (use null for a missing label)"
            ) from None
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise ValueError(f"objective `{column}` is {value!r}, not a number (use null for a missing label)")
    if math.isnan(number):
        raise ValueError(f"objective `{column}` is NaN, not a label (use null for a missing label)")
    if math.isinf(number) or abs(number) > _FLOAT32_MAX:
        raise ValueError(f"objective `{column}` is {value!r}, out of the range a float32 label can hold")
    return number


def _user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _stripped_assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text.strip()}]


def _prompt_turns(text: str) -> list[dict]:
    """A prompt string: one user turn, or the turns of an HH transcript prompt (its empty last
    "\\n\\nAssistant:" turn dropped, as TRL's HH datasets end the prompt with it)."""
    if not text.startswith(_HH_PROMPT_START):
        return _user_turn(text)
    turns = parse_hh_transcript(text)
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]
    return turns


def _messages(value, column: str, as_turns: Callable[[str], list[dict]] | None) -> list[dict]:
    """A cell as validated `{"role", "content"}` messages (other keys dropped).

    A string holding a JSON-encoded message list (a csv cell) is decoded; any other string goes through
    `as_turns`, or is an error where the column must hold a message list (`as_turns=None`).
    """
    if isinstance(value, str):
        if value.lstrip().startswith("[{"):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, list) and decoded and all(isinstance(item, dict) for item in decoded):
                value = decoded
        if isinstance(value, str):
            if as_turns is None:
                raise ValueError(f"`{column}` is a string, not a list of messages")
            value = as_turns(value)
    if value is None:
        raise ValueError(f"`{column}` is null")
    if not isinstance(value, list):
        raise ValueError(f"`{column}` is a {type(value).__name__}, not a list of messages or a string")
    return [_message(message, f"`{column}` message {j}") for j, message in enumerate(value)]


def _message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"{where} is a {type(message).__name__}, not a {{'role', 'content'}} dict")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"{where} has role {role!r}; the roles accepted are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"{where} ({role}) has {type(content).__name__} content, not a string")
    if not content.strip():
        raise ValueError(f"{where} ({role}) has empty content")
    return {"role": role, "content": content}


def _check_conversation(messages: list[dict], what: str) -> None:
    """A scored conversation ends with the assistant's answer and has a prompt before it (the gating input)."""
    if not messages:
        raise ValueError(f"{what} has no messages")
    validate_messages(messages, what)


def _layout_error(data: str, split: str, columns: list[str], kind: str, layouts: tuple[str, ...]) -> ValueError:
    accepted = "\n".join(f"  * {layout}" for layout in layouts)
    return ValueError(
        f"{data!r} (split {split!r}) is in no {kind} layout this package reads. Columns found: {columns}. "
        f"Accepted {kind} layouts:\n{accepted}\nRename the columns (`Dataset.rename_column`) to one of these."
    )


def _log_skipped(skipped: list[dict], total: int, data: str) -> None:
    if skipped:
        examples = "; ".join(f"row {entry['index']}: {entry['reason']}" for entry in skipped[:3])
        logger.warning("%s: skipped %d of %d rows (%s ...).", data, len(skipped), total, examples)
