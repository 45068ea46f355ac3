"""--oracle-proposal-fraction: x written by the local oracle itself, as off-policy exploration proposals."""

import itertools
import math
import sqlite3

import pytest
import torch
from cli_helpers import read_jsonl, run_main, tiny_flags

from hf_models import document_start_id, load_causal_lm
from openai_test_server import OpenAITestServer, chat_response_tokens
from reward_oracle import TASKS, HFResponseOracle, PriorScorer, RewardModel


def word_reward_model(word_lm_dirs) -> RewardModel:
    prior_dir, oracle_dir = word_lm_dirs
    prior_model, tokenizer = load_causal_lm(prior_dir)
    oracle_model, oracle_tokenizer = load_causal_lm(oracle_dir)
    oracle = HFResponseOracle(
        oracle_model, oracle_tokenizer, TASKS["raw"], target_response="a b", prompt_format="plain"
    )
    return RewardModel(tokenizer, PriorScorer(prior_model, tokenizer), oracle)


def test_proposals_are_the_oracles_own_samples_and_each_is_a_call(word_lm_dirs):
    reward_model = word_reward_model(word_lm_dirs)
    oracle = reward_model.oracle
    # one-token x: their frequencies are the oracle's next-token distribution after the document start (an x
    # that ends at once is dropped, so renormalised over the 4 words), by a naive forward pass
    with torch.no_grad():
        logits = oracle.model(torch.tensor([[document_start_id(oracle.tokenizer)]])).logits[0, -1].double()
    expected = torch.softmax(logits[:4], dim=0)
    ends_at_once = torch.softmax(logits, dim=0)[4].item()  # <|endoftext|>, the document end
    torch.manual_seed(0)
    rows = reward_model.propose_x(4000, 1, 1, set())
    assert all(len(row) == 1 for row in rows)
    assert len(rows) / 4000 == pytest.approx(1 - ends_at_once, abs=0.03)
    observed = torch.bincount(torch.tensor([row[0] for row in rows]), minlength=4).double() / len(rows)
    assert torch.allclose(observed, expected, atol=0.03), (observed, expected)
    assert expected.max() - expected.min() > 0.1  # the oracle's distribution is far from uniform: the test can fail
    assert reward_model.proposal_calls == reward_model.oracle_calls == reward_model.reward_calls == 4000
    # longer x: cut before any banned token, then to a length drawn from [min_len, length]
    rows = reward_model.propose_x(400, 2, 5, banned={0})
    assert rows and all(2 <= len(row) <= 5 and 0 not in row for row in rows)
    assert len({len(row) for row in rows}) == 4  # every length from 2 to 5 occurs
    assert reward_model.proposal_calls == 4400


def test_proposals_need_a_local_oracle(word_lm_dirs):
    reward_model = word_reward_model(word_lm_dirs)
    reward_model.llm_weight = 0  # prior only: no oracle to write x
    with pytest.raises(ValueError, match="need an oracle that writes x"):
        reward_model.propose_x(4, 1, 2, set())


@pytest.mark.parametrize("separate", [False, True])
def test_training_marks_the_oracles_x_and_counts_its_calls(tiny_lm_dir, tmp_path, separate):
    """By default the local oracle answers the x it writes in the same generation (one call each); with
    --separate-proposal-answers its writing is a call and its answer another. Each row records what it cost,
    and the rows' costs add up to the oracle's own counter."""
    flags = ["--epochs", "3", "--oracle-proposal-fraction", "0.5"] + (["--separate-proposal-answers"] * separate)
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, *flags))
    assert code == 0, err
    samples = read_jsonl(tmp_path / "samples_raw.jsonl")
    metrics = read_jsonl(tmp_path / "metrics_raw.jsonl")
    assert len(samples) == 12  # batch 4 x 3 epochs: proposals too short to use are made up by the policy
    assert metrics[-1]["train/proposal_calls"] == 6  # 2 asked for per epoch, each one an oracle call
    assert metrics[-1]["train/oracle_calls"] == 12 + 6 * separate
    assert metrics[-1]["train/reward_calls"] == 12 + 6 * separate  # the rows scored, and separate writings
    assert sum(s["oracle_calls"] for s in samples) == metrics[-1]["train/oracle_calls"]
    assert {s["oracle_calls"] for s in samples if s["written_by_oracle"]} == {2 if separate else 1}
    for epoch in (1, 2, 3):
        written = [s["written_by_oracle"] for s in samples if s["epoch"] == epoch]
        assert written == sorted(written, reverse=True) and sum(written) <= 2  # the batch's first rows
    assert sum(s["written_by_oracle"] for s in samples) >= 1
    for bad, message in (
        (["--oracle", "openai", "--model", "m"], "needs an oracle that writes x itself"),
        (["--prefetch"], "synchronous batches"),
        (["--llm-weight", "0"], "needs an oracle that writes x itself"),
    ):
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--oracle-proposal-fraction", "0.5", *bad))
        assert code == 2 and message in err and "Traceback" not in err, err
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--oracle-proposal-fraction", "1.5"))
    assert code == 2 and "must be in [0, 1]" in err


def test_the_oracles_share_of_the_batch_moves_to_the_policy_on_schedule(tiny_lm_dir, tmp_path, monkeypatch):
    """--oracle-proposal-fraction-end with --oracle-proposal-anneal FROM TO: the oracle writes its start share up to
    epoch FROM, then a share falling linearly to the end share at TO, and the policy samples the rest."""
    import argparse

    from train import oracle_proposal_fraction

    args = argparse.Namespace(
        oracle_proposal_fraction=0.75, oracle_proposal_fraction_end=0.25, oracle_proposal_anneal=[3, 7]
    )
    shares = [oracle_proposal_fraction(args, epoch) for epoch in range(1, 10)]
    assert shares == pytest.approx([0.75, 0.75, 0.75, 0.625, 0.5, 0.375, 0.25, 0.25, 0.25])
    args.oracle_proposal_fraction_end = None  # no schedule: the start share throughout
    assert {oracle_proposal_fraction(args, epoch) for epoch in range(1, 10)} == {0.75}

    flags = ["--epochs", "5", "--batch-size", "4", "--oracle-proposal-fraction", "1", "--oracle-proposals", "search"]
    schedule = ["--oracle-proposal-fraction-end", "0", "--oracle-proposal-anneal", "2", "4"]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, *flags, *schedule))
    assert code == 0, err
    samples = read_jsonl(tmp_path / "samples_raw.jsonl")
    metrics = read_jsonl(tmp_path / "metrics_raw.jsonl")
    # written per epoch by the oracle's counter: 4, 4, 2, 0, 0 asked for (the search's first epoch has only its
    # root's greedy path to give); rows kept are those long enough, the batch's first ones
    asked = [m["train/proposal_calls"] for m in metrics]
    assert [b - a for a, b in zip([0] + asked, asked)] == [1, 4, 2, 0, 0]
    written = [[s["written_by_oracle"] for s in samples if s["epoch"] == e] for e in range(1, 6)]
    assert all(w == sorted(w, reverse=True) for w in written)
    assert [sum(w) for w in written][3:] == [0, 0] and sum(written[2]) <= 2 and sum(written[1]) >= 3
    assert (
        sum(s["oracle_calls"] for s in samples) == metrics[-1]["train/oracle_calls"] == 20
    )  # one per row, written or not
    # handed to local search instead: its rows per epoch rise by what the oracle gives up (none in epoch 1: the
    # replay buffer is empty), and the policy's own samples stay at none
    import batch_pipeline

    local_rows, original = [], batch_pipeline.SyncBatches.local_search

    def counting(self, size, context=None):
        local_rows.append(size)
        return original(self, size, context)

    monkeypatch.setattr(batch_pipeline.SyncBatches, "local_search", counting)
    handoff = ["--replay-fraction", "0.5", "--oracle-proposal-handoff", "local-search"]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "local", *flags, *schedule, *handoff))
    assert code == 0, err
    assert local_rows == [2, 4, 4]  # epochs 3, 4, 5: shares 0.5 and 1 of the batch (epoch 2: the oracle's 4 rows)
    rows = read_jsonl(tmp_path / "local" / "samples_raw.jsonl")
    marked = [[s["local_search"] for s in rows if s["epoch"] == e] for e in range(1, 6)]
    assert [sum(m) for m in marked] == [0, 0, 2, 4, 4]  # each row says whether local search wrote it
    assert all(m == sorted(m) for m in marked)  # the batch's last rows
    assert not any(s["local_search"] and s["written_by_oracle"] for s in rows)
    for bad, message in (
        (["--oracle-proposal-fraction-end", "0.5"], "needs --oracle-proposal-fraction > 0"),
        (["--oracle-proposal-fraction", "0.5", "--oracle-proposal-fraction-end", "2"], "must be in [0, 1]"),
        (["--oracle-proposal-anneal", "5", "2"], "needs 1 <= FROM <= TO"),
        (["--oracle-proposal-handoff", "local-search"], "set --replay-fraction > 0"),
    ):
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", *bad))
        assert code == 2 and message in err and "Traceback" not in err, err


def test_a_completions_server_writes_x_and_every_one_is_paid_for_once(tiny_lm_dir, tmp_path, monkeypatch):
    """--oracle openai --oracle-format plain: the served model writes x through its completions endpoint, one
    seeded request each (so they differ and are cached apart), in the spend ledger like any answer."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key") as server:
        flags = ["--oracle", "openai", "--base-url", server.base_url, "--model", "gpt-4o-mini"]
        flags += ["--oracle-format", "plain", "--oracle-proposal-fraction", "0.5", "--epochs", "3"]
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, *flags))
        assert code == 0, err
        proposals = [r for r in server.requests if r.get("seed") is not None]
        assert sorted(r["seed"] for r in proposals) == list(range(6))  # 2 an epoch, each its own seed
        # x opens the plain raw text, so the prompt is the document start (llama.cpp's server fails on "")
        tokenizer = load_causal_lm(tiny_lm_dir)[1]
        start = tokenizer.decode([document_start_id(tokenizer)])
        assert start == "<|endoftext|>"
        assert all(r["prompt"] == start and r["temperature"] == 1.0 and r["max_tokens"] == 6 for r in proposals)
        assert all(count == 1 for count in server.billed.values())
        billed = server.billed_total()
    samples = read_jsonl(tmp_path / "samples_raw.jsonl")
    metrics = read_jsonl(tmp_path / "metrics_raw.jsonl")
    assert metrics[-1]["train/proposal_calls"] == 6 and metrics[-1]["train/reward_calls"] == 12 + 6
    written = [s["x"] for s in samples if s["written_by_oracle"]]
    replies = [
        "".join(
            chat_response_tokens(
                "gpt-4o-mini", [{"role": "user", "content": start}, {"role": "seed", "content": str(seed)}], 6
            )[0]
        )
        for seed in range(6)
    ]
    assert written and all(any(reply.startswith(x) for reply in replies) for x in written)  # cut server replies
    assert len(set(written)) > 1
    with sqlite3.connect(str(tmp_path / "response_cache.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == billed  # every paid reply kept
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "chat", *flags[:6], "--oracle-proposal-fraction", "0.5"))
    assert code == 2 and "--oracle-format plain" in err


def test_with_a_fixed_target_an_oracle_x_is_cut_where_it_goes_on_with_the_target(word_lm_dirs):
    """y* = "a b" (ids 0, 1): a written row that continues with y* after k tokens is the opening that made the
    oracle write it, so it is cut at k; other rows get a random length."""
    reward_model = word_reward_model(word_lm_dirs)
    assert list(reward_model.oracle.target_ids) == [0, 1]
    written = [[2, 3, 0, 1, 3], [0, 1, 2, 2, 2], [3, 3, 3, 3, 3, 3], [2, 0, 1]]
    asked = []

    def propose(num, max_new_tokens, first_seed=0, start_text=""):
        asked.append(max_new_tokens)
        return written[:num]

    reward_model.oracle.propose = propose
    torch.manual_seed(0)
    rows = reward_model.propose_x(4, 1, 4, set())
    assert asked == [4 + 2]  # room for y*'s first tokens after an opening of max_len
    assert rows[0] == [2, 3] and rows[3] == [2]  # cut right before "a b"
    assert rows[1] == [0, 1, 2, 2][: len(rows[1])]  # "a b" at the very start: no opening, a random length
    assert rows[2] == [3] * len(rows[2]) and 1 <= len(rows[2]) <= 4


def test_branch_search_writes_every_greedy_completed_text_once(word_lm_dirs):
    """Run to exhaustion on 4 words and 3 tokens, the search writes exactly the texts a naive enumeration says it
    can write (every 3-token text, and every shorter one after which the model's greedy choice is to end), each
    once; the first is the greedy text itself."""
    _, oracle_dir = word_lm_dirs
    model, tokenizer = load_causal_lm(oracle_dir)
    oracle = HFResponseOracle(model, tokenizer, TASKS["raw"], temperature=0.0, prompt_format="plain")
    oracle.start_search(width=4)
    start, end = document_start_id(tokenizer), 4

    def greedy_next(ids: list[int]) -> int:
        with torch.no_grad():
            return int(model(torch.tensor([[start] + ids])).logits[0, -1].argmax())

    expected = set()
    for length in range(4):
        for ids in itertools.product(range(4), repeat=length):
            if length == 3 or greedy_next(list(ids)) == end:
                expected.add(ids)
    greedy, ids = [], []
    while len(greedy) < 3 and greedy_next(ids) != end:
        ids.append(greedy_next(ids))
        greedy = list(ids)
    written = []
    while True:
        batch = oracle.propose(5, 3)
        if not batch:
            break
        written += [tuple(row) for row in batch]
    assert written[0] == tuple(greedy)
    assert len(written) == len(set(written)) and set(written) == expected


def test_a_run_with_search_proposals_resumes_where_the_search_was(tiny_lm_dir, tmp_path):
    flags = ["--oracle-proposal-fraction", "0.5", "--oracle-proposals", "search", "--save-every", "2"]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "a", "--epochs", "4", *flags))
    assert code == 0, err
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "b", "--epochs", "2", *flags))
    assert code == 0, err
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "b", "--epochs", "4", "--resume", *flags))
    assert code == 0, err
    straight, resumed = (read_jsonl(tmp_path / d / "samples_raw.jsonl") for d in ("a", "b"))
    written = [s["x"] for s in straight if s["written_by_oracle"]]
    assert len(written) >= 4 and len(set(written)) == len(written)  # the search proposes nothing twice
    assert [s["x"] for s in resumed] == [s["x"] for s in straight]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "c", "--oracle", "openai", "--model", "m", *flags))
    assert code == 2 and "--oracle-proposals search needs" in err


def test_importance_estimates_leave_out_the_x_the_oracle_wrote():
    from types import SimpleNamespace

    from evaluation import importance_log_z
    from run_log import importance_metrics

    # rows: written, written, drawn (invalid), drawn, drawn; the training batch holds the 4 valid ones in order
    valid = torch.tensor([True, True, False, True, True])
    written = torch.tensor([True, True, False, False, False])
    log_q = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    batch = SimpleNamespace(rewards=SimpleNamespace(valid=valid), written_by_oracle=written, log_q=log_q)
    log_reward, log_pf = torch.tensor([0.0, 1.0, -2.0, -3.0]), torch.tensor([-1.0, -2.0, -4.0, -5.0])
    metrics = importance_metrics(batch, log_reward, log_pf)
    # naive: log mean exp(log R - log q) over the two drawn rows only
    naive = math.log((math.exp(-2.0 + 4.0) + math.exp(-3.0 + 5.0)) / 2)
    assert metrics["eval/log_Z_importance"] == pytest.approx(naive, abs=1e-9)
    assert importance_log_z(log_reward, log_q[valid]) != pytest.approx(naive, abs=1e-3)  # all rows: biased
    batch.written_by_oracle = torch.tensor([True, True, True, True, True])
    assert importance_metrics(batch, log_reward, log_pf) == {}
    batch.written_by_oracle = None  # no proposals: every valid row
    assert importance_metrics(batch, log_reward, log_pf)["eval/log_Z_importance"] == pytest.approx(
        importance_log_z(log_reward, log_q[valid]), abs=1e-9
    )


def naive_log_probs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) float64 log-softmax after each prefix of ids: one unpadded forward pass, no cache."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)


@pytest.mark.parametrize("x_temperature", [0.0, 1.0])
def test_writing_then_answering_in_one_generation_matches_a_naive_forward_pass(word_lm_dirs, x_temperature):
    """write_then_answer against teacher forcing, row by row: prompts of different lengths (left padding and the
    KV cache), a bridge read between x and y, x stopped at its limit or before a stop token, y ended by an end
    token or max_answer_tokens. Every x and y log-probability, and every x step's distribution, is the naive
    one; a greedy x is the argmax at every step."""
    from hf_models import write_then_answer

    _, oracle_dir = word_lm_dirs
    model, _ = load_causal_lm(oracle_dir)
    start, end, bridge = 4, 4, [2, 3]
    prompts = [[start], [start, 0, 1], [start, 3], [start, 2, 2, 2, 0]] * 4
    limits = [3, 1, 4, 0] * 4
    torch.manual_seed(0)
    rows = write_then_answer(
        model, prompts, limits, [0] * len(prompts), {end, 1}, bridge, 5, {end}, end, x_temperature, 1.0, True
    )
    stopped_early = truncated = ended = 0
    for prompt, limit, row in zip(prompts, limits, rows):
        assert len(row.x) <= limit and not {end, 1} & set(row.x)
        full = prompt + row.x + bridge + row.answer
        reference = naive_log_probs(model, full)
        x_at = range(len(prompt) - 1, len(prompt) - 1 + len(row.x))
        assert row.x_log_probs == pytest.approx([float(reference[p, t]) for p, t in zip(x_at, row.x)], abs=1e-5)
        steps = len(row.x) + (len(row.x) < limit)  # a step that chose a stop token is kept too
        assert len(row.x_step_log_probs) == steps
        for j, step in enumerate(row.x_step_log_probs):
            assert torch.allclose(step.double(), reference[len(prompt) - 1 + j], atol=1e-5)
        if x_temperature == 0:
            assert [int(step.argmax()) for step in row.x_step_log_probs[: len(row.x)]] == row.x
        if len(row.x) < limit:
            stopped_early += 1
            assert int(row.x_step_log_probs[-1].argmax()) in {end, 1} or x_temperature > 0
        y_at = range(len(prompt + row.x + bridge) - 1, len(full) - 1)
        assert row.answer_log_probs == pytest.approx(
            [float(reference[p, t]) for p, t in zip(y_at, row.answer)], abs=1e-5
        )
        assert row.truncated == (len(row.answer) == 5 and row.answer[-1] != end)
        truncated += row.truncated
        ended += bool(row.answer) and row.answer[-1] == end
        assert end not in row.answer[:-1]
    assert stopped_early and truncated and ended  # every way of stopping occurred: the test can fail


def test_a_row_whose_x_stops_short_is_not_answered(word_lm_dirs):
    from hf_models import write_then_answer

    _, oracle_dir = word_lm_dirs
    model, _ = load_causal_lm(oracle_dir)
    every_word = {0, 1, 2, 3, 4}  # x must stop at once
    rows = write_then_answer(model, [[4], [4, 0]], [3, 3], [1, 0], every_word, [], 4, {4}, 4, 1.0, 1.0)
    assert rows[0].x == [] and rows[0].answer is None  # shorter than its minimum of 1
    assert rows[1].x == [] and rows[1].answer is not None and len(rows[1].answer) >= 1


def test_search_proposals_answered_in_the_same_generation_are_the_separate_ones(word_lm_dirs):
    """A search whose proposals are answered in place writes the same x, in the same order, as one whose
    proposals are scored apart, and each answer (greedy y) is the one `score` gives for that x; one call each."""
    reward_models = [word_reward_model(word_lm_dirs) for _ in range(2)]
    for reward_model in reward_models:
        reward_model.oracle.target_ids = None  # y sampled (greedy: temperature 0), not a fixed target
        reward_model.oracle.deterministic = False
        reward_model.oracle.temperature = 0.0
        reward_model.oracle.start_search(width=4)
    fused, separate = reward_models
    assert fused.answers_proposals
    separate.answer_proposals_in_place = False
    assert not separate.answers_proposals
    written, answers = [], []
    for _ in range(6):
        rows, results = fused.propose_answered(5, 1, 4, set())
        written += rows
        answers += results
    expected = []
    for _ in range(6):
        expected += separate.propose_x(5, 1, 4, set())
    # the greedy text from the document start is empty (its first choice is to end): dropped, its call spent
    assert written == expected and len(set(map(tuple, written))) == len(written) == 24
    scored = separate.oracle.score([], token_ids=written)
    assert [a.token_ids for a in answers] == [s.token_ids for s in scored]
    assert [a.log_likelihood for a in answers] == pytest.approx([s.log_likelihood for s in scored], abs=1e-5)
    assert fused.oracle_calls == fused.proposal_calls == 25 and fused.reward_calls == 0  # rows not combined yet
    assert separate.oracle_calls == 25  # the writing alone; scoring them is 24 more
