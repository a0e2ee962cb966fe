"""`modeling_armorm.heads`, the heads' math written once, against an independent per-row computation in Python.

    t = rightmost position with mask 1        n = t − gating position        r_len = log(1 + n)
    r = W h                                   r' = r T                       s = g · r'        c = g Tᵀ, s = c · r

Each reference below loops over rows and indices with plain Python numbers, so it shares no tensor code with the
functions it checks. The last test ties the two callers together: the model's forward and the stages' path on
stored features (h, h_x and n fed to the chunked functions) give the same r, s and c.
"""

import math

import pytest
import torch

from modeling_armorm import ArmoRMGatingNetwork, heads
from tests.utils import tiny_armorm, tiny_llama_config


K, D = 4, 6
PATTERN = [7, 8, 9]  # stands for "<eot><header>assistant" in a tiny vocabulary


def random_masks(side: str, batch: int = 6, width: int = 9, seed: int = 0) -> torch.Tensor:
    """Masks with 1 to `width` real tokens per row, padded on `side` ("inner": random zeros among the real tokens,
    the first and last kept)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        real = int(torch.randint(1, width + 1, (), generator=generator))
        if side == "right":
            rows.append([1] * real + [0] * (width - real))
        elif side == "left":
            rows.append([0] * (width - real) + [1] * real)
        else:
            row = torch.randint(0, 2, (width,), generator=generator).tolist()
            rows.append([1] + row[1 : real - 1] + [1] + [0] * (width - real) if real > 1 else [1] + [0] * (width - 1))
    return torch.tensor(rows)


# --- Positions from the mask -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left", "inner"])
def test_last_token_is_the_rightmost_real_position(side):
    mask = random_masks(side)
    expected = [max(i for i, m in enumerate(row) if m) for row in mask.tolist()]
    assert heads.last_token_positions(mask).tolist() == expected
    assert heads.last_token_positions(mask.bool()).tolist() == expected


@pytest.mark.parametrize("side", ["right", "left"])
def test_position_ids_count_real_tokens_only(side):
    mask = random_masks(side)
    expected = []
    for row in mask.tolist():
        seen = [sum(row[: i + 1]) for i in range(len(row))]  # real tokens up to and including i
        expected.append([max(count - 1, 0) for count in seen])
    assert heads.position_ids_from_mask(mask).tolist() == expected
    # The real tokens of a padded row see 0, 1, …, as the unpadded row does.
    for positions, row in zip(expected, mask.tolist()):
        assert [p for p, m in zip(positions, row) if m] == list(range(sum(row)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_pattern_is_found_among_real_tokens_only(side):
    rows = [
        [1, 7, 8, 9, 5, 7, 8, 9, 6],  # twice: the last one
        [1, 2, 3, 7, 8, 9],  # at the end
        [1, 7, 8, 5, 9],  # absent
        [1, 7, 8],  # too short for a whole window of real tokens
    ]
    width = max(map(len, rows)) + 1
    pad = 7  # a pad id that starts the pattern: the padding must never complete an occurrence
    ids = [row + [pad] * (width - len(row)) if side == "right" else [pad] * (width - len(row)) + row for row in rows]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
    mask = mask if side == "right" else [m[::-1] for m in mask]

    expected = []
    for row, row_mask in zip(ids, mask):
        starts = [
            i
            for i in range(len(row) - len(PATTERN) + 1)
            if row[i : i + len(PATTERN)] == PATTERN and all(row_mask[i : i + len(PATTERN)])
        ]
        expected.append(max(starts, default=-1))
    found = heads.last_pattern_positions(torch.tensor(ids), torch.tensor(mask), PATTERN)
    assert found.tolist() == expected
    assert expected[2] == expected[3] == -1


# Turn headers of a toy template (`ArmoRMConfig.turn_header_patterns`): the gating pattern is the assistant header.
HEADERS = {"system": [2, 4], "user": [3, 4], "assistant": PATTERN}


def misplaced_reference(tokens: list[int], pattern_start: int, headers: dict) -> tuple[bool, bool]:
    """(a prompt turn after the gating pattern, two assistant headers after the last prompt turn) of unpadded tokens."""

    def starts(pattern):
        return [i for i in range(len(tokens) - len(pattern) + 1) if tokens[i : i + len(pattern)] == list(pattern)]

    prompt_turns = [i for role in ("system", "user", "tool") if role in headers for i in starts(headers[role])]
    last_prompt_turn = max(prompt_turns, default=-1)
    answers = [i for i in starts(headers.get("assistant") or PATTERN) if i > last_prompt_turn]
    return last_prompt_turn > pattern_start, len(answers) > 1


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("headers", [HEADERS, {"user": [3, 4]}], ids=["all", "no-assistant-header"])
def test_misplaced_turns_per_row(side, headers):
    """The rule by which raw token ids are refused as not one prompt and one answer, row by row among real tokens."""
    generator = torch.Generator().manual_seed(0)
    pieces = [[1], [4], [2, 4], [3, 4], PATTERN]
    rows = []
    for _ in range(200):
        drawn = torch.randint(
            0, len(pieces), (int(torch.randint(1, 8, (), generator=generator)),), generator=generator
        )
        rows.append([t for i in drawn.tolist() for t in pieces[i]])
    width = max(map(len, rows)) + 1
    pad = 3  # a pad id that starts the user header (a row may start with 4): padding must never complete one
    pads = [width - len(row) for row in rows]
    ids = [row + [pad] * n if side == "right" else [pad] * n + row for row, n in zip(rows, pads)]
    mask = [[1] * len(row) + [0] * n if side == "right" else [0] * n + [1] * len(row) for row, n in zip(rows, pads)]
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    pattern_starts = heads.last_pattern_positions(ids, mask, PATTERN)

    turn_after_answer, second_answer = heads.misplaced_turns(ids, mask, pattern_starts, headers, PATTERN)
    expected = []
    for row, n, start in zip(rows, pads, pattern_starts.tolist()):
        shift = n if side == "left" and start >= 0 else 0
        expected.append(misplaced_reference(row, start - shift, headers))
    assert list(zip(turn_after_answer.tolist(), second_answer.tolist())) == expected
    assert {flags for flags in expected} >= {(False, False), (True, False), (False, True)}
    unchecked = heads.misplaced_turns(ids, mask, pattern_starts, None, PATTERN)  # a checkpoint made before the headers
    assert not any(flags.any() for flags in unchecked)


def test_answer_length_and_its_reward():
    last, gating = torch.tensor([9, 4, 12, 3]), torch.tensor([2, 4, 0, 1])
    n = heads.answer_lengths(last, gating)
    assert n.tolist() == [7, 0, 12, 2]
    assert heads.answer_lengths(15, 6) == 9  # an unpadded conversation: len − 1 − gating position
    torch.testing.assert_close(
        heads.length_reward(n, torch.float64),
        torch.tensor([math.log(1 + v) for v in [7, 0, 12, 2]], dtype=torch.float64),
    )


# --- The heads on one batch ----------------------------------------------------------------------------------------


def per_row_rewards(h: torch.Tensor, W: torch.Tensor) -> list[list[float]]:
    """r_i = Σ_j W_ij h_j, row by row."""
    return [[sum(W[i, j].item() * row[j].item() for j in range(W.shape[1])) for i in range(W.shape[0])] for row in h]


def per_row_heads(r: list[list[float]], g: torch.Tensor, T: torch.Tensor) -> tuple[list[float], list[list[float]]]:
    """s = Σ_i g_i Σ_j r_j T_ji and c_i = Σ_j g_j T_ij, row by row."""
    k = len(r[0])
    s, c = [], []
    for r_row, g_row in zip(r, g.tolist()):
        r_t = [sum(r_row[j] * T[j, i].item() for j in range(k)) for i in range(k)]
        s.append(sum(g_row[i] * r_t[i] for i in range(k)))
        c.append([sum(g_row[j] * T[i, j].item() for j in range(k)) for i in range(k)])
    return s, c


@pytest.fixture
def weights():
    torch.manual_seed(0)
    return {
        "h": torch.randn(5, D, dtype=torch.float64),
        "W": torch.randn(K, D, dtype=torch.float64),
        "T": torch.eye(K, dtype=torch.float64) + 0.3 * torch.randn(K, K, dtype=torch.float64),
        "g": torch.softmax(torch.randn(5, K, dtype=torch.float64), -1) * 3.0,
        "n": torch.tensor([0, 3, 17, 250, 1]),
    }


def test_rewards_from_the_weight_or_the_layer(weights):
    h, W = weights["h"], weights["W"]
    expected = torch.tensor(per_row_rewards(h, W), dtype=torch.float64)
    torch.testing.assert_close(heads.rewards(h, W), expected)
    layer = torch.nn.Linear(D, K, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(W)
    torch.testing.assert_close(heads.rewards(h, layer), expected)


@pytest.mark.parametrize("column", [0, 2, K - 1])
def test_length_objective_replaces_its_column(weights, column):
    r = heads.rewards(weights["h"], weights["W"])
    out = heads.set_length_objective(r, weights["n"], column)
    for row, (r_row, n) in enumerate(zip(r.tolist(), weights["n"].tolist())):
        expected = [math.log(1 + n) if i == column else value for i, value in enumerate(r_row)]
        torch.testing.assert_close(out[row], torch.tensor(expected, dtype=torch.float64))


def test_length_objective_appended_last_equals_the_checkpoint_column(weights):
    """A regression file has no row for the length objective (appended, k + 1 columns); the checkpoint assembled from
    it holds a zero row for it at index k and replaces that column: the same r."""
    h, W, n = weights["h"], weights["W"], weights["n"]
    appended = heads.append_length_objective(heads.rewards(h, W), n)
    assert appended.shape == (len(h), K + 1)
    for row, (r_row, count) in enumerate(zip(per_row_rewards(h, W), n.tolist())):
        torch.testing.assert_close(appended[row], torch.tensor([*r_row, math.log(1 + count)], dtype=torch.float64))
    checkpoint_W = torch.cat([W, W.new_zeros(1, D)])  # what `armorm assemble` writes
    torch.testing.assert_close(heads.set_length_objective(heads.rewards(h, checkpoint_W), n, K), appended)


def test_answer_lengths_must_match_the_rewards(weights):
    r = heads.rewards(weights["h"], weights["W"])
    short = weights["n"][:3]
    for add in (lambda: heads.append_length_objective(r, short), lambda: heads.set_length_objective(r, short, 0)):
        with pytest.raises(ValueError, match=r"`answer_lengths` has shape \(3,\), the rewards \(5,\)"):
            add()


def test_score_and_coefficients(weights):
    h, W, T, g = weights["h"], weights["W"], weights["T"], weights["g"]
    r = heads.rewards(h, W)
    s, c = heads.scores(g, heads.transform(r, T)), heads.coefficients(g, T)
    expected_s, expected_c = per_row_heads(per_row_rewards(h, W), g, T)
    torch.testing.assert_close(s, torch.tensor(expected_s, dtype=torch.float64))
    torch.testing.assert_close(c, torch.tensor(expected_c, dtype=torch.float64))
    torch.testing.assert_close((c * r).sum(-1), s)  # s = c · r


# --- The heads on stored features, in chunks -------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(heads, "CHUNK_ROWS", 2)  # 5 rows: chunks of 2, 2, 1


@pytest.mark.parametrize("lengths", [False, True])
def test_chunked_rewards_of_pair_features(small_chunks, lengths):
    torch.manual_seed(1)
    features = torch.randn(5, 2, D).to(torch.bfloat16)  # (N, 2, d): stored bfloat16, computed in float64
    W, T = torch.randn(K, D), torch.eye(K + lengths) + 0.3 * torch.randn(K + lengths, K + lengths)
    n = torch.randint(0, 300, (5, 2))
    answer_lengths = n if lengths else None

    r = heads.chunked_rewards(features, W, torch.float64, answer_lengths)
    r_t = heads.chunked_transformed_rewards(features, W, T, torch.float64, answer_lengths)
    assert r.shape == r_t.shape == (5, 2, K + lengths) and r.dtype == torch.float64
    for i in range(5):
        for side in range(2):
            h = features[i, side].double()[None]
            expected = per_row_rewards(h, W.double())[0] + ([math.log(1 + n[i, side].item())] if lengths else [])
            torch.testing.assert_close(r[i, side], torch.tensor(expected, dtype=torch.float64))
            r_t_expected = [sum(expected[j] * T[j, c].item() for j in range(K + lengths)) for c in range(K + lengths)]
            torch.testing.assert_close(r_t[i, side], torch.tensor(r_t_expected, dtype=torch.float64))
    assert heads.chunked_rewards(features[:0], W).shape == (0, 2, K)


def test_pair_scores_gate_once_per_pair(small_chunks):
    torch.manual_seed(2)
    gated = [0, 2, 3]
    gating = heads_gating(gated)
    h_x, r_t = torch.randn(5, D), torch.randn(5, 2, K)
    s = heads.pair_scores(gating, h_x, r_t)
    g = gating(h_x)
    assert (g[:, 1] == 0).all()  # outside the gate: weight exactly 0
    for i in range(5):
        for side in range(2):
            expected = sum(g[i, j].item() * r_t[i, side, j].item() for j in range(K))
            assert s[i, side].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def heads_gating(gated):
    network = ArmoRMGatingNetwork(D, K, hidden_dim=8, n_hidden=2, temperature=2.0, gated_objectives=gated)
    torch.nn.init.constant_(network.logit_scale, 3.0)
    return network.eval()


# --- The model and the stored-features path agree -------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_model_equals_its_heads_on_stored_features(small_chunks, side):
    """Pairs (two answers to one prompt) scored by the forward, and by the stages from what extraction stores: h and
    h_x of the forward's output, n = the answer's tokens; W without the length objective's row, which the stored
    path appends last (`length_objective` = k − 1 here, as `armorm assemble` puts it)."""
    model = tiny_armorm(
        tiny_llama_config(vocab_size=64, pad_token_id=0),
        gating_token_pattern=PATTERN,
        length_objective=K - 1,
        gated_objectives=[0, 2, 3],
    )
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25]]
    answers = [([30, 31, 7], [32, 7]), ([33, 34, 35, 36, 7], [37, 7]), ([38, 7], [39, 40, 41, 7])]
    rows = [prompt + PATTERN + answer for prompt, pair in zip(prompts, answers) for answer in pair]  # (2B,) rows
    width = max(map(len, rows))
    fill = [[0] * (width - len(row)) for row in rows]
    ids = torch.tensor([row + f if side == "right" else f + row for row, f in zip(rows, fill)])
    mask = torch.tensor([[1] * len(row) + [0] * len(f) if side == "right" else [0] * len(f) + [1] * len(row)
                         for row, f in zip(rows, fill)])  # fmt: skip
    n = torch.tensor([len(answer) - 1 + len(PATTERN) for pair in answers for answer in pair])  # after the gating token

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        W, T = model.regression_layer.weight[: K - 1], model.reward_transform_matrix  # stored path: no length row
        pairs = len(prompts)
        h = out.hidden_state.view(pairs, 2, -1)  # (B, 2, d), as `armorm extract` stores `embeddings`
        h_x = out.prompt_embedding.view(pairs, 2, -1)[:, 0]  # (B, d): the chosen side's pass
        n = n.view(pairs, 2)  # (B, 2), as `armorm extract` stores `answer_lengths`
        r = heads.chunked_rewards(h, W, answer_lengths=n)  # (B, 2, k)
        s = heads.pair_scores(model.gating, h_x, heads.chunked_transformed_rewards(h, W, T, answer_lengths=n))
        c = heads.coefficients(model.gating(h_x), T)

    torch.testing.assert_close(out.rewards, r.view(2 * pairs, K))
    torch.testing.assert_close(out.rewards[:, K - 1], torch.tensor([math.log(1 + v) for v in n.flatten().tolist()]))
    torch.testing.assert_close(out.score, s.view(2 * pairs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.coefficients.view(pairs, 2, K)[:, 0], c, atol=1e-5, rtol=1e-5)
