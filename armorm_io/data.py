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

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import math
import numbers
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
from huggingface_hub.errors import HfUriError
from tqdm.auto import tqdm

from armorm_io.files import Fingerprint, atomic_write, check_location, file_sha256, hub_unreachable
from modeling_armorm.scoring import ROLES, validate_messages


logger = logging.getLogger(__name__)

# The `datasets` builder of each local file extension (compressed files are read through their inner extension).
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CHECKERS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}  # `<tool> -t FILE` tests a compressed file
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
# In a csv file only an empty cell is missing: pandas' default would also read "NaN", "NA", "null", "None"... as
# missing, labels and answers alike, without a word.
_CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}
BATCH_SIZE = 1024  # rows decoded per `datasets` batch: big enough to amortise Arrow decoding, small in memory
# `datasets` types a json column of mixed types (numbers and strings) as `Json`; older releases have no such type.
_JSON_FEATURE = getattr(datasets, "Json", ())
# A JSON escape of half a UTF-16 surrogate pair (U+D800-U+DFFF).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SCAN_CHUNK = 1 << 24
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


def load_table(
    data: str | os.PathLike, split: str = "train", name: str | None = None, *, sha256: str | None = None
) -> datasets.Dataset:
    """One split of `data` as a `datasets.Dataset`: a local file (builder picked by extension), a local data
    folder, or a Hub dataset id (`name` = its configuration).

    A local file or folder is read keyed on its content's sha256, and hashed again after the read: a change is an
    error. `sha256` is that hash as the caller already took it (`data_fingerprint(data).sha256`, the one its report
    records): the data is then hashed once, after the read, and refused unless it still has that content. A json
    row whose text cannot be encoded (a lone surrogate such as "\\ud83d") is read as an empty row and logged;
    `load_ratings` and `load_pairs` list it in `skipped`."""
    table, unreadable, _ = _read_table(data, split, name, sha256)
    if unreadable:
        logger.warning("%s: %d rows cannot be read, left empty: %s", os.fspath(data), len(unreadable), unreadable)
    return table


def _read_table(
    data: str | os.PathLike, split: str, name: str | None, sha256: str | None = None, exact: bool = False
) -> tuple[datasets.Dataset, dict[int, str], dict[str, list]]:
    """`load_table`; the rows (index in the split → reason) read as empty because their text cannot be encoded;
    with `exact`, the exact values of the columns that `datasets` decodes lossily (`_exact_json_values`), read
    before the content is hashed again so that they too are the content hashed."""
    data = os.fspath(data)
    if os.path.isfile(data) or os.path.isdir(data):
        digest = sha256 or _content_sha256(data)
        # `datasets` trusts its cache of a local file while its path and modification time are unchanged, so new
        # content under the old mtime (`cp -p`, `rsync -a`, `tar x`) would be read as the old rows. Key the cache on
        # the content itself: other bytes, another cache folder and a fresh read.
        cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "armorm", digest)
        if os.path.isfile(data):
            table, unreadable = _read_file(data, split, cache_dir)
            sources = [data] if BUILDERS.get(_inner_extension(data)) == "json" else []
        else:
            (table, builder), unreadable = _load_dataset(data, name, split, cache_dir), {}
            sources = _json_data_files(builder, split)
        values = _exact_json_values(table, sources, split, data) if exact else {}
        if _content_sha256(data) != digest:
            shutil.rmtree(cache_dir, ignore_errors=True)
            raise ValueError(
                f"{data!r} changed while it was read: its content no longer has the sha256 {digest} it was read "
                "under, and the rows read may not be the content hashed. Read it again once nothing writes to it."
            )
        return _non_empty(table, data), unreadable, values
    if (
        os.path.splitext(data)[1].lower() in (*BUILDERS, *COMPRESSIONS)
        or data.startswith(("/", "."))
        or sha256 is not None  # hashed as local data, gone since
    ):
        raise FileNotFoundError(f"No such data file: {data!r}. Check the path (an absolute path is safest).")
    check_location(data, "The data")
    try:
        table, builder = _load_dataset(data, name, split)
    except (OSError, ConnectionError, ValueError) as error:  # offline, unknown id, no access
        raise hub_unreachable(data, "The data", error) from error
    values = _exact_json_values(table, _json_data_files(builder, split), split, data) if exact else {}
    return _non_empty(table, data), {}, values


def _load_dataset(
    data: str, name: str | None, split: str, cache_dir: str | None = None
) -> tuple[datasets.Dataset, datasets.DatasetBuilder]:
    """A data folder or Hub dataset through `datasets`, and its builder. Its csv files are read as a single csv file
    is (`_CSV_OPTIONS`)."""
    builder = datasets.load_dataset_builder(data, name, cache_dir=cache_dir)
    options = _CSV_OPTIONS if builder.name == "csv" else {}
    return datasets.load_dataset(data, name, split=split, cache_dir=cache_dir, **options), builder


def _json_data_files(builder: datasets.DatasetBuilder, split: str) -> list[str]:
    """The local json files `split` was read from, in the order of its rows: a data folder's own files, or the
    copies of a Hub dataset's files that `datasets` downloaded. Empty unless every file is json and at hand."""
    if builder.name != "json":
        return []
    files = [_local_copy(str(path)) for path in (builder.config.data_files or {}).get(split.split("[", 1)[0], [])]
    found = all(path is not None and BUILDERS.get(_inner_extension(path)) == "json" for path in files)
    return files if found else []


def _local_copy(path: str) -> str | None:
    """A data file's local path: the file itself, or for a Hub file (`hf://datasets/org/name@commit/file`) the copy
    in the Hub cache, at the commit `datasets` read (looked up, never downloaded). None without one."""
    if not path.startswith("hf://"):
        return path if os.path.isfile(path) else None
    try:
        uri = huggingface_hub.parse_hf_uri(path)
    except HfUriError:
        return None
    cached = huggingface_hub.try_to_load_from_cache(
        uri.id, uri.path_in_repo, revision=uri.revision, repo_type=uri.type
    )
    return cached if isinstance(cached, str) else None


def _read_file(data: str, split: str, cache_dir: str) -> tuple[datasets.Dataset, dict[int, str]]:
    base = os.path.basename(data).lower()
    compression = next((suffix for suffix in COMPRESSIONS if base.endswith(suffix)), None)
    builder = BUILDERS.get(os.path.splitext(base.removesuffix(compression or ""))[1])
    if builder is None:
        raise ValueError(
            f"Cannot read {data!r}: unknown file type. Give a {', '.join(BUILDERS)} file (optionally "
            f"compressed: {', '.join(COMPRESSIONS)}), a data folder, or a Hub dataset id."
        )
    if os.path.getsize(data) == 0:
        raise ValueError(f"{data!r} is empty: no rows to read.")
    # A local file has one split; name it after the requested one so that slices such as `train[:100]` work.
    split_name = split.split("[", 1)[0]
    options = _CSV_OPTIONS if builder == "csv" else {}
    try:
        if builder == "json" and _has_surrogate_escape(data):
            read = _read_json_skipping_unencodable(data, split, split_name, cache_dir)
            if read is not None:
                return read
        table = datasets.load_dataset(
            builder, data_files={split_name: data}, split=split, cache_dir=cache_dir, **options
        )
    except StopIteration as error:  # `datasets` finds no row to infer the schema from
        raise ValueError(f"{data!r} holds no rows: nothing to read.") from error
    except (EOFError, OSError, zlib.error, lzma.LZMAError, datasets.exceptions.DatasetGenerationError) as error:
        if compression is None or not _caused_by(error, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile):
            raise
        cause = _root_cause(error)
        raise ValueError(
            f"{data!r} is not a complete {compression} file ({type(cause).__name__}: {cause}): it was cut short or "
            f"is corrupt. Copy or compress it again (`{_CHECKERS[compression]} -t {data}` checks it)."
        ) from error
    return table, {}


def _caused_by(error: BaseException, *types: type) -> bool:
    while error is not None:
        if isinstance(error, types):
            return True
        error = error.__cause__ or error.__context__
    return False


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return error


def _has_surrogate_escape(data: str) -> bool:
    """Whether a json file holds a UTF-16 surrogate escape ("\\ud83d"): only then can it hold a lone one."""
    if not _python_reads(data):
        return False
    tail = b""
    with _open_compressed(data, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            if _SURROGATE_ESCAPE.search(tail + chunk):
                return True
            tail = chunk[-5:]
    return False


def _read_json_skipping_unencodable(
    data: str, split: str, split_name: str, cache_dir: str
) -> tuple[datasets.Dataset, dict[int, str]] | None:
    """A json file whose text cannot be encoded as UTF-8 (a lone surrogate such as the escape "\\ud83d", common in
    scraped text) is refused whole by pyarrow, or read with that text silently dropped. Find those rows with
    Python's json, and read the file through `datasets` with each of them as an empty row (so that every other
    row keeps its index). None when every row can be encoded."""
    rows = _json_rows(data)
    if rows is None:
        return None
    lines, unreadable = [], {}
    for i, row in enumerate(rows):
        reason = (
            _unencodable(row) if isinstance(row, dict) else f"the row is a json {type(row).__name__}, not an object"
        )
        if reason:
            unreadable[i] = reason
        lines.append("{}" if reason else json.dumps(row))
    if not unreadable:
        return None
    readable = os.path.join(cache_dir, "readable", os.path.basename(data).split(".", 1)[0] + ".jsonl")
    atomic_write(readable, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    table = datasets.load_dataset("json", data_files={split_name: readable}, split=split, cache_dir=cache_dir)
    start = _split_start(split, split_name, len(rows))
    return table, {i - start: reason for i, reason in unreadable.items() if start <= i < start + len(table)}


def _json_rows(data: str) -> list | None:
    """A json or json-lines file's rows as Python's json reads them (NaN, ±Infinity and every string exact), or
    None where it holds neither a list nor one value a line."""
    if not _python_reads(data):
        return None
    with _open_compressed(data, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)
        return rows if isinstance(rows, list) else None
    except json.JSONDecodeError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return None


def _open_compressed(data: str, mode: str, **kwargs):
    return _OPENERS.get(os.path.splitext(data)[1].lower(), open)(data, mode, **kwargs)


def _python_reads(data: str) -> bool:
    """Whether Python's standard library can decompress `data` (a .zst file needs `datasets`' own reader)."""
    extension = os.path.splitext(data)[1].lower()
    return extension not in COMPRESSIONS or extension in _OPENERS


def _unencodable(row: dict) -> str | None:
    """Why a row's text cannot be stored as UTF-8, naming its column, or None."""
    for column, value in row.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as error:
            character = error.object[error.start : error.end]
            return (
                f"`{column}` holds text that cannot be encoded as UTF-8 ({character!r}, a lone surrogate: half of a "
                "UTF-16 pair, as text cut mid-emoji leaves it). Repair or drop that text"
            )
    return None


def _split_start(split: str, split_name: str, total: int) -> int:
    """Where a split slice such as `train[10:]` starts in the file's rows."""
    return datasets.ReadInstruction.from_spec(split).to_absolute({split_name: total})[0].from_


def _non_empty(table: datasets.Dataset, data: str) -> datasets.Dataset:
    if len(table) == 0:
        raise ValueError(f"{data!r} holds no rows: nothing to read. Check the file (or the split's slice).")
    return table


def _content_sha256(data: str) -> str:
    """The sha256 of a local file, or of every file of a local folder (relative path and sha256, in path order)."""
    if os.path.isfile(data):
        return file_sha256(data)
    files = sorted(path for path in Path(data).rglob("*") if path.is_file() and not path.name.startswith("."))
    listing = [[path.relative_to(data).as_posix(), file_sha256(path)] for path in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def data_fingerprint(data: str | os.PathLike) -> Fingerprint:
    """What identifies the data's content: the sha256 of a local file, of every file of a local folder, or None for a
    Hub dataset id (`datasets` resolves its revision itself). A stage passes it on (`load_ratings(...,
    sha256=fingerprint.sha256)`): the data is read only if it still has this content, so that the hash the stage
    records is the one of the rows it read, and a large file is hashed twice (here and after the read), not three
    times."""
    data = os.fspath(data)
    return Fingerprint(data, _content_sha256(data) if os.path.exists(data) else None)


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
    data: str | os.PathLike,
    split: str = "train",
    objectives: list[str] | None = None,
    name: str | None = None,
    *,
    sha256: str | None = None,
) -> RatingRows:
    """Read rated responses: conversations and their (N, k) labels, NaN where missing.

    Args:
        data: a Hub dataset id, a local data folder or a json/jsonl/json.gz/parquet/csv file.
        split: the split to read (a local file's only split takes this name; slices like `train[:100]` work).
        objectives: the label columns, in order; default every numeric column but the conversation and ids
            (`id`, `*_id`, `index`, `*_index`, ...), in the data's column order.
        name: the Hub dataset configuration.
        sha256: the local data's sha256 as the caller recorded it (`data_fingerprint`): read only if unchanged.
    """
    data = os.fspath(data)
    table, unreadable, exact = _read_table(data, split, name, sha256, exact=True)
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

    exact = {column: values for column, values in exact.items() if column in objectives}
    messages, labels, index, skipped = [], [], [], []
    for i, row in _iter_rows(table, conversation_columns + objectives, f"Reading ratings from {data}"):
        if i in unreadable:
            skipped.append({"index": i, "reason": unreadable[i]})
            continue
        row.update({column: values[i] for column, values in exact.items()})
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


def load_pairs(
    data: str | os.PathLike,
    split: str = "train",
    name: str | None = None,
    *,
    keep_ties: bool = False,
    sha256: str | None = None,
) -> PairRows:
    """Read preference pairs as full `chosen` / `rejected` conversations that share their prompt.

    Args:
        data: a Hub dataset id, a local data folder or a json/jsonl/json.gz/parquet/csv file.
        split: the split to read (a local file's only split takes this name; slices like `train[:100]` work).
        name: the Hub dataset configuration.
        keep_ties: keep the pairs that state no preference (the same answer twice, or equal `score_chosen` and
            `score_rejected`). Training skips them (it learns nothing from a tie); evaluation keeps them, as
            RewardBench does, and counts an equal score as wrong.
        sha256: the local data's sha256 as the caller recorded it (`data_fingerprint`): read only if unchanged.
    """
    data = os.fspath(data)
    table, unreadable, _ = _read_table(data, split, name, sha256)
    columns = list(table.column_names)
    if "chosen" not in columns or "rejected" not in columns:
        raise _layout_error(data, split, columns, "pairs", PAIR_LAYOUTS)
    explicit = "prompt" in columns
    group = "subset" if "subset" in columns else "source" if "source" in columns else None
    read = ["chosen", "rejected"] + (["prompt"] if explicit else []) + ([group] if group else [])
    read += [column for column in SCORE_COLUMNS if column in columns]

    chosen_rows, rejected_rows, subset, index, skipped = [], [], [], [], []
    for i, row in _iter_rows(table, read, f"Reading pairs from {data}"):
        if i in unreadable:
            skipped.append({"index": i, "reason": unreadable[i]})
            continue
        try:
            chosen, rejected = pair_conversations(row)
            if not keep_ties:
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


def pair_conversations(row: dict) -> tuple[list[dict], list[dict]]:
    """A pair row's `chosen` and `rejected` as two full conversations that share every turn but the last, in any
    pairs layout of this module: with an explicit prompt when `row` has a `prompt` key. Raises a `ValueError` that
    names the column (the row is then skipped by its caller); a tie is not checked here."""
    if "prompt" in row:
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
        raise ValueError("`chosen` and `rejected` have different prompts (every turn but the last must be the same)")
    return chosen, rejected


def _check_not_a_tie(row: dict) -> None:
    """A pair whose own ratings are equal (UltraFeedback's `score_chosen == score_rejected`, at the top level or in
    a `metadata` column) is a tie, not a preference: training on it would read noise as a label."""
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


def _exact_json_values(table: datasets.Dataset, sources: list[str], split: str, data: str) -> dict[str, list]:
    """The exact values of the columns that `datasets` types `Json` (numbers and strings mixed), which it decodes
    lossily: JSON NaN becomes null, ±Infinity and the string "NaN" become None, the string "Infinity" becomes inf.
    The json files (`sources`: one file, or the split's files in row order, a Hub dataset's as downloaded) are read
    again with Python's json. Without them (a Hub dataset read offline from the `datasets` cache, a .zst file) a
    value stored but decoded as None is marked unreadable, so that `_label` lists it instead of taking it for a
    missing label, and a JSON NaN, stored as null, is missing: logged."""
    mixed = [
        column
        for column, feature in table.features.items()
        if isinstance(feature, _JSON_FEATURE) and column not in TEXT_COLUMNS
    ]
    if not mixed:
        return {}
    files = [_json_rows(path) for path in sources]
    if files and all(rows is not None and all(isinstance(row, dict) for row in rows) for rows in files):
        rows = [row for file_rows in files for row in file_rows]
        start = _split_start(split, split.split("[", 1)[0], len(rows))
        rows = rows[start : start + len(table)]
        if len(rows) == len(table):
            return {column: [row.get(column) for row in rows] for column in mixed}
    exact = {}
    for column in mixed:
        stored, decoded = table.data.column(column).to_pylist(), table[column]
        exact[column] = [
            _NOT_A_NUMBER if value is None and text is not None else value for text, value in zip(stored, decoded)
        ]
        if any(text is None for text in stored):
            logger.warning(
                "%s: column `%s` mixes numbers and strings and its json text is not at hand to read again: its "
                "nulls are read as missing labels, and a JSON NaN, which `datasets` stores as null, cannot be told "
                "from them. Read the json files themselves (online, or a local copy) to list NaN labels.",
                data,
                column,
            )
    return exact


def _inner_extension(data: str) -> str:
    base = os.path.basename(data).lower()
    for compression in COMPRESSIONS:
        base = base.removesuffix(compression)
    return os.path.splitext(base)[1]


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# A stored value `datasets` decodes as None (a JSON NaN or ±Infinity): listed as such, never a missing label.
_NOT_A_NUMBER = object()
# Labels are stored as float32: a larger magnitude would become ±inf there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _label(value, column: str) -> float:
    """A label as a float: null → NaN (missing), booleans → 0/1, a string holding a number (a csv cell) → that
    number. Anything else is an error that skips the row: a string that is not a number, NaN or ±Infinity (JSON
    `NaN` is not "missing": that is null), or a magnitude float32 cannot hold."""
    if value is None:
        return math.nan
    if value is _NOT_A_NUMBER:
        raise ValueError(f"objective `{column}` is NaN or ±Infinity, not a label (use null for a missing label)")
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
