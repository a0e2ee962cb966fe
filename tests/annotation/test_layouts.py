"""`annotation.layouts`: each published layout read into prompts and candidates, against the values written out by
hand in the test; grouping order; every reason a row is skipped; layout detection and its errors."""

import json

import datasets
import pytest

from annotation.layouts import LAYOUTS, Candidates, Skipped, detect_layout, read_candidates
from armorm_io.data import load_table


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def as_json(rows: list[dict]) -> datasets.Dataset:
    """Rows whose columns mix types (a number among answers), as `datasets` stores such a json column."""
    return datasets.Dataset.from_list(rows, features=datasets.Features({c: datasets.Json() for c in rows[0]}))


def write_jsonl(rows: list[dict], path) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def test_all_generated_responses():
    """SimPO's on-policy data: a prompt string (or messages) and the generated answers; its other columns unread."""
    table = datasets.Dataset.from_list(
        [
            {"prompt_id": "a", "prompt": "Name a prime.", "all_generated_responses": ["2", "4", "7"], "chosen": []},
            {"prompt_id": "b", "prompt": "Say hi.", "all_generated_responses": ["hi", ""], "chosen": []},
        ]
    )
    candidates, skipped = read_candidates(table)
    assert skipped == []
    assert candidates == [
        Candidates([user("Name a prime.")], ["2", "4", "7"], [0, 0, 0]),
        Candidates([user("Say hi.")], ["hi", ""], [1, 1]),  # an empty answer is a candidate, scored as such
    ]
    messages = datasets.Dataset.from_list(
        [{"prompt": [system("Be brief."), user("Name a prime.")], "all_generated_responses": ["2", "3"]}]
    )
    assert read_candidates(messages) == (
        [Candidates([system("Be brief."), user("Name a prime.")], ["2", "3"], [0, 0])],
        [],
    )


def test_completions_strings_and_messages():
    """`messages` ending with the assistant's turn: the prompt is the messages up to the last user turn. A completion
    given as [assistant message] is its text."""
    table = datasets.Dataset.from_list(
        [
            {
                "messages": [user("Hi."), assistant("Hello."), user("Name a prime."), assistant("2")],
                "completions": [[assistant("3")], [assistant("5")]],
            },
            {"messages": [system("Terse."), user("Say hi.")], "completions": [[assistant("hi")]]},
            {"messages": [user("Count."), assistant("1"), assistant("2")], "completions": [[assistant("1 2")]]},
        ]
    )
    candidates, skipped = read_candidates(table)
    assert skipped == []
    assert candidates == [
        Candidates([user("Hi."), assistant("Hello."), user("Name a prime.")], ["3", "5"], [0, 0]),
        Candidates([system("Terse."), user("Say hi.")], ["hi"], [1]),
        Candidates([user("Count.")], ["1 2"], [2]),
    ]
    strings = datasets.Dataset.from_list([{"prompt": "Name a prime.", "completions": ["2", "3"]}])
    assert read_candidates(strings) == ([Candidates([user("Name a prime.")], ["2", "3"], [0, 0])], [])


def ultrafeedback_completion(model: str, response) -> dict:
    return {
        "annotations": {"helpfulness": {"Rating": "4", "Rationale": "ok"}},
        "critique": "fine",
        "custom_system_prompt": "You are a helpful assistant.",
        "fine-grained_score": 4.5,
        "model": model,
        "overall_score": 8.0,
        "principle": "helpfulness",
        "response": response,
    }


def test_ultrafeedback_read_through_load_table(tmp_path):
    """openbmb/UltraFeedback's rows written as jsonl and read by the package's loader: `completions` arrives as a list
    of structs, and only each `response` is a candidate (the custom system prompt is not read)."""
    rows = [
        {
            "source": "evol_instruct",
            "instruction": "Name a prime.",
            "models": ["gpt-4", "llama-2"],
            "completions": [ultrafeedback_completion("gpt-4", "2"), ultrafeedback_completion("llama-2", "9")],
            "correct_answers": ["2"],
            "incorrect_answers": ["9"],
        },
        {
            "source": "sharegpt",
            "instruction": "Say hi.",
            "models": [],
            "completions": [],
            "correct_answers": [],
            "incorrect_answers": [],
        },
        {
            "source": "sharegpt",
            "instruction": "Say bye.",
            "models": ["gpt-4", "llama-2"],
            "completions": [ultrafeedback_completion("gpt-4", "bye"), ultrafeedback_completion("llama-2", None)],
            "correct_answers": [],
            "incorrect_answers": [],
        },
        {
            "source": "flan",
            "instruction": "Count to 3.",
            "models": ["gpt-4"],
            "completions": [ultrafeedback_completion("gpt-4", "1 2 3")],
            "correct_answers": [],
            "incorrect_answers": [],
        },
    ]
    table = load_table(write_jsonl(rows, tmp_path / "ultrafeedback.jsonl"))
    assert isinstance(table.features["completions"], datasets.List)  # the real loader's nested type
    assert detect_layout(table.column_names) == "ultrafeedback"
    candidates, skipped = read_candidates(table)
    assert candidates == [
        Candidates([user("Name a prime.")], ["2", "9"], [0, 0]),
        Candidates([user("Count to 3.")], ["1 2 3"], [3]),
    ]
    assert [entry.row for entry in skipped] == [1, 2]
    assert "`completions` holds no candidates (an empty list)" in skipped[0].reason
    assert "candidate 1 of `completions` has no text `response` (got None)" in skipped[1].reason


def test_prompt_completion_rows_are_grouped_by_prompt():
    """Groups in the order their prompts first appear, answers in row order; a skipped row leaves its group's other
    answers; a string prompt and the same prompt as one user message are one group."""
    conversational = datasets.Dataset.from_list(
        [
            {"prompt": [user("p1")], "completion": [assistant("a")]},
            {"prompt": [system("s"), user("p2")], "completion": [assistant("b")]},
            {"prompt": [user("p1")], "completion": [assistant("c")]},
            {"prompt": [user("p3")], "completion": [assistant("d")]},
            {"prompt": [user("p1")], "completion": [user("not an answer")]},
            {"prompt": [system("s"), user("p2")], "completion": [assistant("e")]},
            {"prompt": [user("p2")], "completion": [assistant("f")]},  # no system turn: another prompt
        ]
    )
    candidates, skipped = read_candidates(conversational)
    assert candidates == [
        Candidates([user("p1")], ["a", "c"], [0, 2]),
        Candidates([system("s"), user("p2")], ["b", "e"], [1, 5]),
        Candidates([user("p3")], ["d"], [3]),
        Candidates([user("p2")], ["f"], [6]),
    ]
    assert [entry.row for entry in skipped] == [4]
    assert "`completion` is a 'user' message, not the assistant's answer" in skipped[0].reason

    mixed = as_json(
        [
            {"prompt": "p1", "completion": "a"},
            {"prompt": [user("p1")], "completion": [assistant("b")]},
            {"prompt": "p2", "completion": None},
        ]
    )
    candidates, skipped = read_candidates(mixed)
    assert candidates == [Candidates([user("p1")], ["a", "b"], [0, 1])]
    assert skipped == [Skipped(2, skipped[0].reason)] and "`completion` is None, not text" in skipped[0].reason


def test_chosen_rejected_pairs():
    """Explicit prompt (strings or messages) and implicit prompt (the common leading turns): each row is a group of
    its two answers, identical answers included (re-annotation scores them; the pair rule counts them as a tie)."""
    explicit = datasets.Dataset.from_list(
        [
            {"prompt": "Name a prime.", "chosen": "2", "rejected": "4", "score_chosen": 9.0},
            {"prompt": "Say hi.", "chosen": "hi", "rejected": "hi", "score_chosen": 1.0},
        ]
    )
    assert read_candidates(explicit) == (
        [Candidates([user("Name a prime.")], ["2", "4"], [0, 0]), Candidates([user("Say hi.")], ["hi", "hi"], [1, 1])],
        [],
    )
    implicit = datasets.Dataset.from_list(
        [
            {
                "chosen": [system("s"), user("Hi."), assistant("Hello."), user("Prime?"), assistant("2")],
                "rejected": [system("s"), user("Hi."), assistant("Hello."), user("Prime?"), assistant("4")],
            },
            {"chosen": [user("a"), assistant("b")], "rejected": [user("other"), assistant("c")]},
            {
                "chosen": [user("Hi."), assistant("Hello."), assistant("2")],
                "rejected": [user("Hi."), assistant("Hello."), assistant("4")],
            },
        ]
    )
    candidates, skipped = read_candidates(implicit)
    assert candidates == [
        Candidates([system("s"), user("Hi."), assistant("Hello."), user("Prime?")], ["2", "4"], [0, 0])
    ]
    assert [entry.row for entry in skipped] == [1, 2]
    assert "different prompts" in skipped[0].reason
    assert "ends with the assistant's turn, not the user's" in skipped[1].reason


GOOD = {"prompt": "Name a prime.", "completions": ["2", [assistant("3")]]}
# (row, the reason's words): every way a row of the `completions` layout fails, each naming the column.
BAD_ROWS = [
    ({"prompt": "p", "completions": []}, "`completions` holds no candidates (an empty list)"),
    ({"prompt": "p", "completions": None}, "`completions` holds no candidates (None)"),
    ({"prompt": "p", "completions": "two"}, "`completions` holds no candidates ('two')"),
    ({"prompt": "p", "completions": ["2", None]}, "candidate 1 of `completions` is None, not text"),
    ({"prompt": "p", "completions": ["2", 7]}, "candidate 1 of `completions` is 7, not text"),
    ({"prompt": "p", "completions": [{"text": "2"}]}, "candidate 0 of `completions` is {'text': '2'}, not text"),
    ({"prompt": "p", "completions": [[user("2")]]}, "candidate 0 of `completions` is a 'user' message"),
    ({"prompt": "p", "completions": [[assistant("2"), assistant("3")]]}, "holds 2 messages, not one answer"),
    ({"prompt": "p", "completions": [[{"role": "assistant", "content": None}]]}, "None as content, not text"),
    (
        {"prompt": "p", "completions": [[{**assistant("2"), "tool_calls": [{"name": "f"}]}]]},
        "the conversation of candidate 0 of `completions`: message 1 has 'tool_calls', which the reward model",
    ),
    ({"prompt": "", "completions": ["2"]}, "`prompt` is empty"),
    ({"prompt": " \n", "completions": ["2"]}, "`prompt` is empty"),
    ({"prompt": [system(""), user(" ")], "completions": ["2"]}, "`prompt` is empty"),
    ({"prompt": None, "completions": ["2"]}, "`prompt` is None, not a string or a list of messages"),
    ({"prompt": 12, "completions": ["2"]}, "`prompt` is 12, not a string or a list of messages"),
    ({"prompt": [], "completions": ["2"]}, "`prompt` is an empty list"),
    ({"prompt": [user("q"), assistant("a")], "completions": ["2"]}, "ends with the assistant's turn"),
    ({"prompt": [user(["q"])], "completions": ["2"]}, "`prompt`: message 0 must be a dict with a string `content`"),
    ({"prompt": [{"role": "tool", "content": "q"}], "completions": ["2"]}, "`prompt`: message 0 has role 'tool'"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS, ids=[reason for _, reason in BAD_ROWS])
def test_a_bad_row_is_skipped_with_its_reason(bad, reason):
    """The bad row between two good ones: it alone is skipped, with a reason that names the column and a fix."""
    candidates, skipped = read_candidates(as_json([GOOD, bad, GOOD]))
    good = Candidates([user("Name a prime.")], ["2", "3"], [0, 0])
    assert candidates == [good, Candidates(good.prompt, good.answers, [2, 2])]
    assert [entry.row for entry in skipped] == [1]
    assert reason in skipped[0].reason
    assert any(fix in skipped[0].reason for fix in ("give", "drop", "fill", "join", "write", "fold", "must"))


@pytest.mark.parametrize(
    "columns,layout",
    [
        (
            ["prompt_id", "prompt", "all_generated_responses", "all_rm_scores", "chosen", "rejected"],
            "all_generated_responses",
        ),
        (["source", "instruction", "models", "completions", "correct_answers", "incorrect_answers"], "ultrafeedback"),
        (["prompt", "instruction", "completions"], "ultrafeedback"),
        (["messages", "completions"], "completions"),
        (["prompt", "completions"], "completions"),
        (["prompt", "completion", "label"], "prompt_completion"),
        (
            ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"],
            "chosen_rejected",
        ),
        (["chosen", "rejected"], "chosen_rejected"),
    ],
)
def test_detect_layout(columns, layout):
    """SimPO's, UltraFeedback's, TRL's and HuggingFaceH4/ultrafeedback_binarized's columns."""
    assert detect_layout(columns) == layout


def test_layout_errors():
    with pytest.raises(ValueError) as error:
        detect_layout(["text", "label"])
    assert "['text', 'label']" in str(error.value) and all(layout in str(error.value) for layout in LAYOUTS)
    table = datasets.Dataset.from_list([{"prompt": "p", "completion": "a"}])
    with pytest.raises(ValueError, match=r"no `prompt` or `messages` and no `all_generated_responses`") as error:
        read_candidates(datasets.Dataset.from_list([{"text": "p"}]), layout="all_generated_responses")
    with pytest.raises(ValueError, match=r"`completions` layout .* no `completions` \(its columns: \['prompt', 'com"):
        read_candidates(table, layout="completions")
    with pytest.raises(ValueError, match="Unknown layout 'pairs': choose one of all_generated_responses, completions"):
        read_candidates(table, layout="pairs")
    assert read_candidates(table, layout="prompt_completion") == ([Candidates([user("p")], ["a"], [0])], [])
