import contextlib
import io
import json
import os

import sweep


def test_sweep_runs_each_grid_point_in_its_own_directory_and_compares_them(tiny_lm_dir, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = sweep.main(
            [
                "--grid",
                "prior-weight=0.5,1.0",
                "llm-weight=0",
                "--tail",
                "2",
                "--",
                "--prior-model",
                tiny_lm_dir,
                "--oracle",
                "hf",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--max-len",
                "5",
                "--d-model",
                "32",
                "--num-layers",
                "1",
                "--no-progress",
                "--device",
                "cpu",
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert code == 0
    names = ["prior-weight=0.5_llm-weight=0", "prior-weight=1.0_llm-weight=0"]
    for name in names:
        assert os.path.exists(tmp_path / name / "checkpoint_gfn_raw_epoch2.pt")
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert sorted(summary) == names
    # with llm weight 0 the reward is w_prior * log p(x): the two runs' ratio shows the flag reached each run
    half, full = summary[names[0]], summary[names[1]]
    assert abs(half["train/log_reward_mean"] - 0.5 * half["train/log_prior_mean"]) < 1e-3
    assert abs(full["train/log_reward_mean"] - full["train/log_prior_mean"]) < 1e-3
    table = out.getvalue().splitlines()
    assert table[0].startswith("run") and [line.split()[0] for line in table[1:]] == names


def test_sweep_rejects_a_malformed_grid(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = sweep.main(["--grid", "prior-weight", "--", "--output-dir", str(tmp_path)])
    assert code == 2 and err.getvalue().startswith("error: --grid entries look like")


def test_contradiction_summary_rates_are_the_samples_own(tmp_path):
    """On-topic = names the subject and the answer is judged related; rates over the first and the last epochs."""
    import math

    half_up, half_down = math.log(0.6), math.log(0.4)
    metrics = [{"epoch": e, "train/loss": 1.0, "train/log_contradiction_mean": -1.0} for e in (1, 2, 3, 4)]
    samples = [
        # epoch 1: one on-topic contradiction of two
        {"epoch": 1, "x": "Who built the Eiffel Tower?", "subject": "Eiffel Tower", "log_related": half_up,
         "log_contradiction": half_up},
        {"epoch": 1, "x": "What is the sky?", "subject": "Eiffel Tower", "log_related": half_up,
         "log_contradiction": half_up},
        # epoch 4: on topic but not contradicting; names the subject but judged unrelated
        {"epoch": 4, "x": "Is the Eiffel Tower tall?", "subject": "Eiffel Tower", "log_related": half_up,
         "log_contradiction": half_down},
        {"epoch": 4, "x": "Eiffel Tower", "subject": "Eiffel Tower", "log_related": half_down,
         "log_contradiction": half_up},
    ]  # fmt: skip
    with open(tmp_path / "metrics_contradiction.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    with open(tmp_path / "samples_contradiction.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    summary = sweep.summarise(str(tmp_path), "contradiction", 1)
    assert summary["first_on_topic_contradiction_rate"] == 0.5
    assert summary["on_topic_contradiction_rate"] == 0.0
    assert summary["contradiction_rate"] == 0.5 and summary["on_topic_rate"] == 0.5 and summary["question_rate"] == 0.5
    assert summary["train/log_contradiction_mean"] == -1.0 and "train/log_prior_mean" not in summary
