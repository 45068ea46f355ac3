"""The contradiction task end to end on tiny local models: training, samples, per-example log Z, evaluation."""

import contextlib
import io
import json
import math
import random
import types

import pytest
import torch
from test_contradiction_reward import save_tiny_nli

import sample
import train
from batch_pipeline import ScoredBatch
from checkpoint import load_checkpoint
from contradiction_reward import ContradictionRewardConfig, PhaseFormula, names_subject
from replay_buffer import make_replay_buffer
from reward_oracle import OracleResult, RewardBatch

EXAMPLES = [
    {"id": "fox-1", "subject": "the quick brown fox", "edit_fact": "The fox is slow and green."},
    {"id": "paris-1", "subject": "Paris", "edit_fact": "The capital of France is Rome."},
]


@pytest.fixture()
def task_files(tmp_path, tiny_lm_dir):
    data = tmp_path / "edits.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    nli = save_tiny_nli(str(tmp_path / "nli"), {0: "entailment", 1: "neutral", 2: "contradiction"})
    return str(data), nli


def contradiction_flags(model_dir, data, nli, output_dir, *extra):
    return [
        "--task",
        "contradiction",
        "--policy",
        "lora",
        "--prior-model",
        model_dir,
        "--data",
        data,
        "--nli-model",
        nli,
        "--batch-size",
        "4",
        "--max-len",
        "6",
        "--answer-max-tokens",
        "4",
        "--lora-r",
        "4",
        "--epochs",
        "4",
        "--save-every",
        "4",
        "--penalized-steps",
        "2",
        "--contradiction-threshold",
        "-1.2",
        "--output-dir",
        str(output_dir),
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        "2",
        *extra,
    ]


def test_contradiction_training_writes_every_term_and_keeps_a_log_z_per_example(tiny_lm_dir, task_files, tmp_path):
    data, nli = task_files
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = train.main(contradiction_flags(tiny_lm_dir, data, nli, tmp_path / "run"))
    assert code == 0, err.getvalue()[-2000:]
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples_contradiction.jsonl")]
    assert len(samples) == 16
    # epochs alternate over the examples, in dataset order
    assert [s["example_id"] for s in samples[::4]] == ["fox-1", "paris-1", "fox-1", "paris-1"]
    assert [s["phase"] for s in samples[::4]] == ["penalized", "penalized", "composite", "composite"]  # 2 steps
    for s in samples:
        assert s["y"] is not None and s["log_contradiction"] <= 0 and s["log_question"] < 0
    for s in samples:  # the relevance terms (defaults w_R 1, off-topic penalty -20) are recorded and summed
        assert s["log_related"] <= 0 and s["subject_question"] in (0.0, 1.0)
        assert s["subject_question"] == float("?" in s["x"] and names_subject(s["x"], s["subject"]))
    # the relevance and answer terms of the defaults: w_R 1, off-topic -20, w_A 0.5, -20 below log P_A -25
    relevance = [
        s["log_related"] - 20.0 * (1 - s["subject_question"]) + 0.5 * s["log_answer"] - 20.0 * (s["log_answer"] < -25)
        for s in samples
    ]
    for s, extra in zip(samples[:8], relevance):  # the penalised phase: fluency where contradicting, on subject
        passes = s["log_contradiction"] >= -1.2 and s["subject_question"] == 1.0
        assert s["log_reward"] == pytest.approx((s["log_question"] if passes else -100.0) + extra)
    for s, extra in zip(samples[8:], relevance[8:]):
        assert s["log_reward"] == pytest.approx(s["log_contradiction"] + s["log_question"] + extra)
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint_gfn_contradiction_epoch4.pt"))
    assert state["log_z_conditions"] == ["fox-1", "paris-1"] and bool(state["log_z"]["initialized"].all())
    assert state["log_z"]["values"][0] != state["log_z"]["values"][1]

    summary_out = tmp_path / "eval.jsonl"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = sample.main(
            [
                "--checkpoint",
                str(tmp_path / "run" / "checkpoint_gfn_contradiction_epoch4.pt"),
                "--task",
                "contradiction",
                "--samples-per-subject",
                "3",
                "--output",
                str(summary_out),
                "--device",
                "cpu",
            ]
        )
    assert code == 0, err.getvalue()[-2000:]
    assert "overall" in err.getvalue()  # the table
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert [r["example_id"] for r in summary["per_example"]] == ["fox-1", "paris-1"]
    records = [json.loads(line) for line in open(summary_out)]
    assert len(records) == 6
    for row in summary["per_example"]:
        assert 0 <= row["contradiction_rate"] <= 1 and 0 < row["unique_fraction"] <= 1
        mine = [r for r in records if r["example_id"] == row["example_id"]]
        # the rates are the records' own: on topic = names the subject and judged related (P(neutral) < 0.5)
        on_topic = [names_subject(r["question"], r["subject"]) and r["log_related"] > math.log(0.5) for r in mine]
        assert [r["on_topic"] for r in mine] == on_topic
        assert row["on_topic_rate"] == pytest.approx(sum(r["on_topic"] for r in mine) / 3)
        both = sum(r["on_topic"] and r["log_contradiction"] > math.log(0.5) for r in mine) / 3
        assert row["on_topic_contradiction_rate"] == pytest.approx(both)
        assert len(row["examples"]) == 3 and row["examples"][0]["answer"] == mine[0]["answer"]
    assert "Q: " in err.getvalue() and "A: " in err.getvalue()  # questions with their answers, per subject


def test_contradiction_replay_rescores_stored_terms_and_resumes_with_the_same_losses(tiny_lm_dir, task_files, tmp_path):
    """Replay works for the contradiction task: the buffer keeps each question's terms (log C, log P_Q, log P_A),
    and a question stored in the penalised phase is replayed under the composite formula once that phase begins.
    An interrupted and resumed run logs the same losses as an uninterrupted one."""
    data, nli = task_files

    def run(output_dir, *more):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = train.main(
                contradiction_flags(tiny_lm_dir, data, nli, output_dir, "--replay-fraction", "0.5", *more)
            )
        assert code == 0, err.getvalue()[-2000:]
        with open(output_dir / "metrics_contradiction.jsonl") as f:
            return {m["epoch"]: m for m in map(json.loads, f)}

    straight = run(tmp_path / "a", "--epochs", "6", "--save-every", "2")
    # epochs 1-2 fill each example's heap; from epoch 3 on every batch of 4 questions gets 4 replayed ones
    assert [straight[e]["train/num_replayed"] for e in range(1, 7)] == [0, 0, 4, 4, 4, 4]
    assert {"train/log_contradiction_mean", "train/log_question_mean", "train/log_answer_mean"} <= set(straight[3])
    assert "train/log_prior_mean" not in straight[3]  # no term is logged under another's name

    state = load_checkpoint(str(tmp_path / "a" / "checkpoint_gfn_contradiction_epoch2.pt"))
    stored = [row for rows in state["replay"]["entries"].values() for row in rows]
    assert stored and all(
        set(json.loads(row[4]))
        == {"log_contradiction", "log_related", "subject_question", "log_question", "log_answer"}
        for row in stored
    )
    run(tmp_path / "b", "--epochs", "2", "--save-every", "2")
    resumed = run(tmp_path / "b", "--epochs", "6", "--save-every", "2", "--resume")
    assert {e: m["train/loss"] for e, m in resumed.items()} == pytest.approx(
        {e: m["train/loss"] for e, m in straight.items()}, rel=1e-5, abs=1e-6
    )


def test_replayed_questions_are_rescored_by_the_current_phase_formula():
    """training_batch: replayed rows get log R from their stored terms under the fresh batch's formula (here the
    composite phase), not the formula in force when they were stored (the penalised phase)."""
    config = ContradictionRewardConfig(
        penalized_steps=2,
        contradiction_threshold=-1.0,
        likelihood_weight=0.5,
        answer_quality_weight=0.0,
        answer_quality_threshold=None,
    )
    terms = {
        "log_contradiction": torch.tensor([-0.1, -3.0], dtype=torch.float64),
        "log_question": torch.tensor([-8.0, -2.0], dtype=torch.float64),
        "log_answer": torch.tensor([-4.0, -1.0], dtype=torch.float64),
    }

    def scored(step):
        formula = PhaseFormula(config, step)
        rewards = RewardBatch(
            ["q1", "q2"],
            terms,
            formula(terms),
            torch.ones(2, dtype=torch.bool),
            [OracleResult("a", 0.0, 1), OracleResult("b", 0.0, 1)],
            formula,
        )
        return ScoredBatch(torch.tensor([[5, 6], [7, 8]]), torch.tensor([2, 2]), torch.zeros(2), rewards, "ex")

    run = types.SimpleNamespace(
        args=types.SimpleNamespace(replay_fraction=0.5, max_len=2),
        device=torch.device("cpu"),
        replay=make_replay_buffer("memory", 10),
        replay_rng=random.Random(0),
    )
    penalised = scored(step=0)
    assert penalised.rewards.log_reward.tolist() == [-4.0, -100.0]  # passes the gate / fails it
    train.training_batch(run, penalised, temperature=1.0)  # stores both
    tokens, lengths, log_reward, num_fresh = train.training_batch(run, scored(step=2), temperature=2.0)
    composite = (terms["log_contradiction"] + 0.5 * terms["log_question"]).tolist()  # -4.1, -4.0
    assert num_fresh == 2 and len(tokens) == 4
    by_row = {tuple(t.tolist()): float(r) for t, r in zip(tokens[2:], log_reward[2:])}
    for row, value in by_row.items():
        assert value == pytest.approx(composite[[(5, 6), (7, 8)].index(row)] / 2.0)


def test_contradiction_task_flag_errors(tiny_lm_dir, task_files, tmp_path):
    data, nli = task_files
    for extra, message in [
        (["--policy", "transformer"], "needs --policy lora"),
        (["--loss", "modified-subtb"], "cannot use --loss modified-subtb"),
    ]:
        argv = contradiction_flags(tiny_lm_dir, data, nli, tmp_path)
        argv[argv.index("--policy") + 1 : argv.index("--policy") + 2] = []
        argv[argv.index("--policy") : argv.index("--policy") + 1] = []
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = train.main(argv + (extra if "--policy" in extra else ["--policy", "lora"] + extra))
        assert code == 2 and message in err.getvalue(), err.getvalue()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "subject": ""}\n')
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = train.main(contradiction_flags(tiny_lm_dir, str(bad), nli, tmp_path))
    assert code == 2 and "bad.jsonl line 1" in err.getvalue().strip().splitlines()[-1]


def test_question_prompt_uses_the_chat_template_when_there_is_one(tiny_lm_dir, tiny_chat_lm_dir):
    from contradiction_task import context_ids, question_prompt
    from hf_models import load_causal_lm

    _, chat_tokenizer = load_causal_lm(tiny_chat_lm_dir)
    _, plain_tokenizer = load_causal_lm(tiny_lm_dir)
    auto = types.SimpleNamespace(question_prompt="auto")
    assert question_prompt(auto, chat_tokenizer) == "chat" and question_prompt(auto, plain_tokenizer) == "plain"
    assert question_prompt(types.SimpleNamespace(), chat_tokenizer) == "plain"  # runs saved before the flag
    chat = chat_tokenizer.decode(context_ids(chat_tokenizer, "Eiffel Tower", "cpu", "chat")[0].tolist())
    assert chat == "<|im_start|>user\nAsk one short question about Eiffel Tower.<|im_end|>\n<|im_start|>assistant\n"
    plain = plain_tokenizer.decode(context_ids(plain_tokenizer, "Eiffel Tower", "cpu", "plain")[0].tolist())
    assert plain == "Here is a question about Eiffel Tower:\n"


def test_judging_against_the_true_fact_needs_and_uses_each_examples_true_fact(tiny_lm_dir, task_files, tmp_path):
    data, nli = task_files

    def run(data_file: str, output_dir) -> tuple[int, str]:
        err = io.StringIO()
        judge = ["--judge-against", "true-fact", "--nli-order", "answer-fact", "--judged-answer", "first-sentence"]
        argv = contradiction_flags(tiny_lm_dir, data_file, nli, output_dir, *judge)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = train.main(argv + ["--epochs", "2", "--save-every", "2"])
        return code, err.getvalue()

    code, err = run(data, tmp_path / "missing")  # EXAMPLES have no true_fact
    assert code == 2 and "needs every example's true_fact" in err and "fox-1" in err and "Traceback" not in err
    with_truth = tmp_path / "with_truth.jsonl"
    true_facts = {"fox-1": "The fox is quick and brown.", "paris-1": "The capital of France is Paris."}
    with_truth.write_text("".join(json.dumps({**e, "true_fact": true_facts[e["id"]]}) + "\n" for e in EXAMPLES))
    code, err = run(str(with_truth), tmp_path / "run")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples_contradiction.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    # log C: the judge's entailment of the row's true fact by the answer's first sentence (premise first)
    from contradiction_reward import NLIScorer, first_sentence

    scorer = NLIScorer.load(nli, "cpu")
    premises = [first_sentence(r["y"]) for r in rows]
    expected = scorer.log_probs(premises, [true_facts[r["example_id"]] for r in rows])[:, scorer.entailment_index]
    assert [r["log_contradiction"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
