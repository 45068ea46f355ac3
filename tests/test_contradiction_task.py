"""The contradiction task end to end on tiny local models: training, samples, per-example log Z, evaluation."""

import contextlib
import io
import json

import pytest
from test_contradiction_reward import save_tiny_nli

import sample
import train
from checkpoint import load_checkpoint

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
    for s in samples[:8]:  # the penalised phase: fluency where contradicting enough, the penalty elsewhere
        expected = s["log_question"] if s["log_contradiction"] >= -1.2 else -100.0
        assert s["log_reward"] == pytest.approx(expected)
    for s in samples[8:]:
        assert s["log_reward"] == pytest.approx(s["log_contradiction"] + s["log_question"])
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
    for row in summary["per_example"]:
        assert 0 <= row["contradiction_rate"] <= 1 and 0 < row["unique_fraction"] <= 1
    assert len(open(summary_out).readlines()) == 6


def test_contradiction_task_flag_errors(tiny_lm_dir, task_files, tmp_path):
    data, nli = task_files
    for extra, message in [
        (["--policy", "transformer"], "needs --policy lora"),
        (["--replay-fraction", "0.5"], "does not support --replay-fraction"),
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
