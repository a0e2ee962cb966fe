"""`annotation.pairs.make_pairs` against a brute-force reading of its rules over random scores with ties.

The rules, read independently here: `all` keeps every ordered (i, j) of scored answers with different texts and
s_i - s_j > m; `best-worst` keeps (argmax, argmin) of the scored answers (first in answer order among equals) when
their texts differ and s_best - s_worst > m. A tie (equal scores or equal texts) counts once per unordered pair under
`all`, once per prompt under `best-worst` when its best and worst tie.
"""

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.data_utils import is_conversational

from annotation.pairs import PAIR_RULES, make_pairs


PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
bounded = settings(max_examples=200, deadline=None, derandomize=True)


def brute_force(answers, scores, rule, margin):
    """(chosen index, rejected index) of every pair, and the ties, straight from the rules."""
    n = len(answers)
    scored = [j for j in range(n) if scores[j] is not None]
    if rule == "all":
        pairs = [
            (i, j)
            for i in range(n)
            for j in range(n)
            if i in scored and j in scored and answers[i] != answers[j] and scores[i] - scores[j] > margin
        ]
        ties = sum(1 for i in scored for j in scored if i < j and (scores[i] == scores[j] or answers[i] == answers[j]))
        return pairs, ties
    if len(scored) < 2:
        return [], 0
    best = sorted(scored, key=lambda j: (-scores[j], j))[0]
    worst = sorted(scored, key=lambda j: (scores[j], j))[0]
    if scores[best] == scores[worst] or answers[best] == answers[worst]:
        return [], 1
    return ([(best, worst)] if scores[best] - scores[worst] > margin else []), 0


# Few distinct texts and scores, so that equal answers and equal scores are common.
candidates = st.integers(0, 7).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from(["2", "3", "5", "seven"]), min_size=n, max_size=n),
        st.lists(st.one_of(st.none(), st.sampled_from([-1.5, 0.0, 0.25, 0.5, 2.0])), min_size=n, max_size=n),
    )
)


@bounded
@given(candidates, st.sampled_from(["all", "best-worst"]), st.sampled_from([0.0, 0.25, 1.0]))
def test_pairs_match_brute_force(candidates, rule, margin):
    answers, scores = candidates
    pairs, ties = make_pairs(PROMPT, answers, scores, rule, min_margin=margin)
    expected, expected_ties = brute_force(answers, scores, rule, margin)
    assert ties == expected_ties
    assert pairs == [
        {
            "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": answers[i]}],
            "rejected": [{"role": "assistant", "content": answers[j]}],
            "score_chosen": scores[i],
            "score_rejected": scores[j],
        }
        for i, j in expected
    ]


def test_known_answers():
    """Scores (2, 0.5, 2, -1, None): the first 2.0 is the best, the None answer is left out; under `all` the two 2.0
    answers tie, and with a margin of 1 only the pairs 1.5 or more apart remain."""
    answers, scores = ["a", "b", "c", "d", "e"], [2.0, 0.5, 2.0, -1.0, None]
    pairs, ties = make_pairs(PROMPT, answers, scores, "best-worst")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("a", "d")] and ties == 0
    pairs, ties = make_pairs(PROMPT, answers, scores, "all", min_margin=1.0)
    chosen_rejected = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert chosen_rejected == [("a", "b"), ("a", "d"), ("b", "d"), ("c", "b"), ("c", "d")] and ties == 1
    # Identical texts never make a pair, whatever their scores.
    assert make_pairs(PROMPT, ["x", "x"], [1.0, 0.0], "all") == ([], 1)
    assert make_pairs(PROMPT, ["x", "x"], [1.0, 0.0], "best-worst") == ([], 1)
    assert make_pairs(PROMPT, ["x", "y"], [1.0, 1.0], "best-worst") == ([], 1)
    assert make_pairs(PROMPT, ["x", "y"], [1.0, None], "best-worst") == ([], 0)
    assert make_pairs(PROMPT, ["x", "y"], [1.0, 0.5], "best-worst", min_margin=0.5) == ([], 0)


def test_pairs_are_trl_conversational_preference_rows():
    pairs, _ = make_pairs(PROMPT, ["2", "9"], [1.0, -1.0], "all")
    assert all(is_conversational(row) for row in pairs)
    table = datasets.Dataset.from_list(pairs)
    assert table.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    assert table[0]["chosen"] == [{"role": "assistant", "content": "2"}] and table[0]["prompt"] == PROMPT
    pairs[0]["prompt"][0]["content"] = "changed"
    assert PROMPT[0]["content"] == "Be brief."  # the caller's prompt is never aliased into a row


def test_none_rule_and_errors():
    assert make_pairs(PROMPT, ["a", "b"], [1.0, 0.0], "none") == ([], 0)
    with pytest.raises(ValueError, match="best-worst, all, none"):
        make_pairs(PROMPT, ["a", "b"], [1.0, 0.0], "pairwise")
    assert PAIR_RULES == ("best-worst", "all", "none")
    with pytest.raises(ValueError, match="min_margin"):
        make_pairs(PROMPT, ["a", "b"], [1.0, 0.0], "all", min_margin=-0.1)
    with pytest.raises(ValueError, match="one score"):
        make_pairs(PROMPT, ["a", "b"], [1.0], "all")
    with pytest.raises(ValueError, match="answer 1 has the score nan"):
        make_pairs(PROMPT, ["a", "b"], [1.0, float("nan")], "all")
