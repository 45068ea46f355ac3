"""Each benchmark script runs on its tiny setting and prints well-formed JSON (the numbers are in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(name: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_api_pool_quick():
    result = run_benchmark("api_pool.py", "--quick")
    (pool,) = result["pool"]
    assert pool["ok"] == pool["requests"] and pool["peak_in_flight"] <= pool["workers"]
    assert 0 < pool["fraction_of_ideal"] <= 1.05
    (faulty,) = result["pool_10pct_429"]
    assert faulty["ok"] == faulty["requests"]
    (run,) = result["epoch"]["runs"]
    assert run["prefetch_on_epoch_s"] > 0 and run["prefetch_off_epoch_s"] > 0
    adaptive, fixed = result["adaptive"]["runs"]  # one slot, 8 workers: only the timings vary from run to run
    assert (adaptive["mode"], fixed["mode"]) == ("adaptive", "fixed") and adaptive["slots"] == fixed["slots"] == 1
    assert adaptive["server_peak_in_slots"] == fixed["server_peak_in_slots"] == 1
    assert 1 <= adaptive["final_limit"] <= 8 and fixed["final_limit"] == fixed["client_peak_in_flight"] == 8
    assert adaptive["ok"] + adaptive["failed"] == fixed["ok"] + fixed["failed"] == adaptive["requests"]


def test_policy_comparison_quick(tiny_chat_lm_dir):
    result = run_benchmark("policy_comparison.py", "--model", tiny_chat_lm_dir, "--quick")
    transformer, lora = result["runs"]
    assert (transformer["policy"], lora["policy"]) == ("transformer", "lora")
    assert transformer["oracle_calls"] == lora["oracle_calls"] == 3 * 4  # the same oracle budget
    for run in result["runs"]:
        assert len(run["samples"]) == 5 and 0 < run["last_2_epochs"]["unique_fraction"] <= 1


def test_throughput_quick():
    result = run_benchmark("throughput.py", "--quick", "--device", "cpu")
    (policy,) = result["policy"]
    assert policy["sample_tokens_per_s_kv_cache"] > 0 and policy["sample_tokens_per_s_recompute"] > 0
    assert policy["train_steps_per_s"] > 0
    (prior,) = result["prior"]
    assert prior["overhead_ratio"] > 0 and result["peak_rss_mb"] > 0


def test_exact_target_quick():
    # torchgfn is a benchmark-only dependency (benchmarks/requirements.txt), not installed by .ci/run
    result = run_benchmark("exact_target.py", "--quick", "--no-torchgfn")
    (target,) = result["targets"]
    assert target["num_sequences"] == 3 + 9 + 27
    assert {(run["policy"], run["loss"]) for run in target["runs"]} == {
        (policy, loss) for policy in ("transformer", "lora") for loss in ("tb", "subtb", "modified-subtb", "vargrad")
    }
    for run in target["runs"]:
        calls = [row["reward_calls"] for row in run["curve"]]
        sampled = [row["sampled_x"] for row in run["curve"]]
        assert sampled[0] == 0 and sampled[-1] == result["reward_calls"] and calls == sorted(calls)
        # every reward evaluation counts: modified SubTB's prefixes on top of the sampled x
        assert calls[-1] > sampled[-1] if run["loss"] == "modified-subtb" else calls == sampled
        for row in run["curve"]:
            assert 0 <= row["tv"] <= 1 and abs(row["tv_sum"] - 2 * row["tv"]) < 1e-9
            assert row["kl_policy_target"] >= -1e-9 and row["kl_target_policy"] >= -1e-9
            assert abs(row["policy_mass"] - 1) < 1e-5
    scratch_tb = next(run for run in target["runs"] if (run["policy"], run["loss"]) == ("transformer", "tb"))
    assert scratch_tb["curve"][-1]["tv"] < scratch_tb["curve"][0]["tv"] - 0.1  # 256 reward calls already help


def test_real_model_quick(tiny_chat_lm_dir):
    result = run_benchmark("real_model.py", "--model", tiny_chat_lm_dir, "--quick")
    assert result["training_oracle_calls"] == result["budget_oracle_calls"] == 8
    assert result["prior"]["count"] == 8 and result["gflownet"]["count"] == result["eval_oracle_calls"] == 4
    best = result["best_of_8"]
    assert best["count"] == 4 and best["log_R_mean"] >= result["prior"]["log_R_mean"]  # the top half by log R
    for key in ("gflownet", "prior", "best_of_8"):
        assert len(result[key]["samples"]) >= 4 and 0 < result[key]["unique_fraction"] <= 1
    assert len(result["training"]) == 2
