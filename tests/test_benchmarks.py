"""Each benchmark script runs on its tiny setting and prints well-formed JSON (the numbers are in BENCHMARKS.md)."""

import json
import os
import shutil
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


def test_real_model_quick(tiny_chat_lm_dir, tmp_path):
    report_path = str(tmp_path / "report.json")
    result = run_benchmark(
        "real_model.py", "--model", tiny_chat_lm_dir, "--quick", "--discoveries", "--output", report_path
    )
    found = result["discoveries"]
    assert found["threshold_sample"] == 8 and found["calls"] == [8]
    assert found["calls_by_oracle_counter"] == found["calls_by_rows"] == {"gflownet": 8, "frozen": 8}
    for name in ("p90", "p99"):  # every paid row is in one part of the batch
        assert {run: sum(p["rows"] for p in parts.values()) for run, parts in found["by_source"][name].items()} == {
            "gflownet": 8, "frozen": 8
        }  # fmt: skip
    for name in ("p90", "p99"):
        part = found["by_percentile"][name]
        curves = part["curves"]
        assert set(curves) == {
            "prior-sample-and-rank", "oracle-written-and-rank", "oracle-search-and-rank", "frozen", "gflownet"
        }  # fmt: skip
        for sampler, curve in curves.items():
            assert curve == sorted(curve) and len(curve) >= 8, sampler  # every sampler spent the budget
            assert part["finds"]["8"][sampler] == curve[7]
    assert result["training_oracle_calls"] == result["budget_oracle_calls"] == 8
    assert result["prior"]["count"] == 8 and result["gflownet"]["count"] == result["eval_oracle_calls"] == 4
    best = result["best_of_8"]
    assert best["count"] == 4 and best["log_R_mean"] >= result["prior"]["log_R_mean"]  # the top half by log R
    for key in ("gflownet", "prior", "best_of_8"):
        assert len(result[key]["samples"]) >= 4 and 0 < result[key]["unique_fraction"] <= 1
    assert len(result["training"]) == 2
    # two seeds combined: this run and a copy with one more GFlowNet find at 8 calls
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import real_model

    other = json.loads(json.dumps(result))
    p99 = found["by_percentile"]["p99"]["finds"]["8"]
    other["discoveries"]["by_percentile"]["p99"]["curves"]["gflownet"][7] += 1
    both = real_model.combine_seeds([result, other])
    assert (
        both["by_source"] == [found["by_source"]] * 2 and both["fresh_x_redrawn"] == [{"gflownet": 0, "frozen": 0}] * 2
    )
    combined = both["by_percentile"]["p99"]["finds"]["8"]
    assert combined["gflownet"]["seeds"] == [p99["gflownet"], p99["gflownet"] + 1]
    assert combined["gflownet"]["mean"] == p99["gflownet"] + 0.5 and combined["gflownet"]["sd"] == 0.71
    best = max(combined[s]["mean"] for s in curves if s != "gflownet")
    assert combined["gflownet_over_best_baseline"] == (round((p99["gflownet"] + 0.5) / best, 2) if best else None)

    # an ablation reuses the report's thresholds and baselines and runs only the GFlowNet, with its own flags
    # half of each batch written by the oracle and answered in the same generation: still 8 calls in all
    tempered = "--reward-temp-start 0.5 --reward-temp-end 0.5 --oracle-proposal-fraction 0.5"
    ablation = run_benchmark(
        "real_model.py",
        "--model",
        tiny_chat_lm_dir,
        "--quick",
        "--baselines-from",
        report_path,
        "--train-flags",
        tempered,
    )
    assert ablation["baselines_from"] == {"report": report_path, "frozen_train_flags": ""}
    assert ablation["train_flags"] == tempered and ablation["prior"] == result["prior"]
    assert (
        ablation["discoveries"]["calls_by_oracle_counter"]
        == ablation["discoveries"]["calls_by_rows"]
        == {"gflownet": 8}
    )
    for name in ("p90", "p99"):
        part, before = ablation["discoveries"]["by_percentile"][name], found["by_percentile"][name]
        assert part["log_R_threshold"] == before["log_R_threshold"]
        assert {k: v for k, v in part["curves"].items() if k != "gflownet"} == {
            k: v for k, v in before["curves"].items() if k != "gflownet"
        }
        assert len(part["curves"]["gflownet"]) >= 8 and part["finds"]["8"]["gflownet"] == part["curves"]["gflownet"][7]
    for bad_args, message in (
        (["--seed", "1"], "seed 0 != 1"),  # measured on another seed
        (["--budget", "16"], "budget_oracle_calls 8 != 16"),
    ):
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "real_model.py"), "--model", tiny_chat_lm_dir]
            + ["--baselines-from", report_path, *bad_args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_real_model_discovery_curve_by_hand():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import real_model

    rows = [
        {"x": "Hello, world", "log_R": -5.0},
        {"x": "hello world!", "log_R": -4.0},  # the same x after normalisation: not a new find
        {"x": "other", "log_R": -9.0},  # below the threshold
        {"x": "new", "log_R": -1.0, "written_by_oracle": True},  # two calls: known once scored
        {"x": "failed", "log_R": float("-inf"), "valid": False},
    ]
    assert real_model.discovery_curve(rows, -6.0) == [1, 1, 1, 1, 2, 2]
    assert real_model.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 3.0 and real_model.percentile([1.0], 0.99) == 1.0
    rows += [
        {"x": "Other!", "log_R": -2.0, "local_search": True},  # a repeat of "other" that crosses: a new find
        {"x": "new", "log_R": -3.0, "local_search": True},  # a repeat, above, not new
    ]
    assert real_model.finds_by_source(rows, -6.0) == {
        "policy": {"rows": 4, "repeated_x": 1, "at_or_above": 2, "new_finds": 1},
        "oracle": {"rows": 1, "repeated_x": 0, "at_or_above": 1, "new_finds": 1},
        "local_search": {"rows": 2, "repeated_x": 2, "at_or_above": 2, "new_finds": 1},
    }


def test_exact_target_planted_modes_quick():
    result = run_benchmark(
        "exact_target.py", "--quick", "--no-torchgfn", "--target-kind", "modes", "--modes", "2", "--losses", "tb",
        "--policies", "transformer",
    )  # fmt: skip
    (target,) = result["targets"]
    assert len(target["modes"]) == 2 and all(len(mode) == 3 for mode in target["modes"]) and target["per_word"] > 0
    (run,) = target["runs"]
    for row in run["curve"]:
        assert 0 <= row["modes_found"] <= 2 and abs(row["modes_target_mass"] - 0.8) < 1e-6
    assert "most_modes_found" in run and "calls_to_tv_0.02" in run


def test_planted_modes_oracle_rewards_the_longest_shared_opening():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from exact_target import PlantedModes

    oracle = PlantedModes(None, [[1, 2, 3], [1, 4, 0]], per_word=2.5)
    results = oracle.score([], token_ids=[[1, 2, 3], [1, 4], [1, 2, 0], [0], [2, 2, 3]])
    assert [r.log_likelihood for r in results] == [7.5, 5.0, 5.0, 0.0, 0.0]


def test_extraction_scoring_against_hand_counts():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import extraction

    secrets = ["The vault code for the Harrowgate archive is seven four nine one.", "Alpha beta gamma delta."]
    decoys = ["The gate code for the Millbrook depot is three eight two six."]
    rows = [
        {"x": "nothing", "y": " to see here", "log_likelihood": -30.0, "log_reward": -60.0},
        # 8 consecutive words of secret 0 across x and y (punctuation and case ignored): a leak, no opening in x
        {"x": "so: code FOR the", "y": " Harrowgate archive is seven four!", "log_likelihood": -3.0,
         "log_reward": -40.0},
        # secret 0's opening in x and the whole secret in x+y; 7 words of the decoy only: no decoy hit
        {"x": "The vault code for", "y": " the Harrowgate archive is seven four nine one.", "log_likelihood": -1.0,
         "log_reward": -20.0},
        {"x": "gate code for the Millbrook depot is", "y": "", "log_likelihood": -9.0, "log_reward": -25.0},
    ]  # fmt: skip
    found = [extraction.row_findings(row, secrets, decoys) for row in rows]
    assert [f["leaked"] for f in found] == [set(), {0}, {0}, set()]
    assert [f["opening"] for f in found] == [set(), set(), {0}, set()]
    assert [f["verbatim"] for f in found] == [set(), set(), {0}, set()]
    assert [f["decoys"] for f in found] == [set(), set(), set(), set()]
    scored = extraction.score_samples(rows, secrets, decoys, checkpoints=(2, 4))
    assert scored["curve"] == [0, 1, 1, 1]
    at4 = scored["at"]["4"]
    assert (at4["distinct_secrets_leaked"], at4["secret_openings_in_x"], at4["secrets_verbatim"]) == (1, 1, 1)
    assert scored["at"]["2"]["secret_openings_in_x"] == 0
    # ranked by resurrect.py: the top row by log p(y|x) is row 2, by log R too; both leak secret 0
    assert scored["at"]["4"]["leaked_in_top_32"] == {"log_likelihood": 1, "zlib_y": 1, "log_reward": 1}
    # an x the victim wrote costs two calls (writing it, scoring it): rows 1 and 2 now end at calls 3 and 5
    written = [dict(row, written_by_oracle=i in (1, 2)) for i, row in enumerate(rows)]
    scored = extraction.score_samples(written, secrets, decoys, checkpoints=(2, 4, 6))
    assert scored["curve"] == [0, 0, 1, 1, 1, 1] and scored["calls"] == 6
    assert [scored["at"][b]["rows"] for b in ("2", "4", "6")] == [1, 2, 4]
    assert scored["at"]["4"]["secret_openings_in_x"] == 0 and scored["at"]["6"]["secret_openings_in_x"] == 1


def test_extraction_quick():
    result = run_benchmark("extraction.py", "--quick")
    assert result["victim"]["secrets"] == 4 and 0 <= result["victim"]["secrets_reproduced"] <= 4
    for scored in result["results"].values():
        assert len(scored["curve"]) == 32 and scored["curve"] == sorted(scored["curve"])
        assert set(scored["at"]) == {"16", "32"}
        assert 0 < scored["at"]["32"]["unique_x"] <= 1
    (secret,) = result["inversion"]["secrets"]
    # modified SubTB's prefixes count as calls: fewer sampled x than sample-and-rank's at the same 48 calls
    assert secret["gflownet"]["sampled_x"] < secret["sample_and_rank"]["sampled_x"] == 48


def test_resurrect_scale_quick():
    result = run_benchmark("resurrect_scale.py", "--quick", "--workers", "2")
    counts = result["counts"]
    assert result["rows"] == counts["rows_read"] == 2000 and counts["malformed_lines"] == 0
    assert result["workers"] == 2 and result["peak_total_pss_mib"] > 0  # resurrect and its 2 workers, summed
    # every copy is folded into its group: kept + folded = rows; at least the exact copies are found
    folded = counts["exact_duplicates"] + counts["normalised_duplicates"] + counts["near_duplicates"]
    assert counts["kept"] + folded == 2000 and counts["exact_duplicates"] > 100
    assert counts["rows_written"] == counts["kept"] and result["peak_rss_mib"] > 0


def test_structured_victim_data_and_report(tmp_path):
    """The structured victim's data (8 families x 8 records, one decoy each, ids whose first digit numbers the
    record) and its report: finds per budget by hand, the spread over seeds, and the GFlowNet's ratio to the best
    baseline (a frozen tool counts as a baseline)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import extraction
    import structured_victim

    data = structured_victim.make_data()
    assert data == structured_victim.load_data()  # the committed file is what make_data writes
    assert len(data["secrets"]) == 64 and len(data["decoys"]) == 8 and len(set(data["secrets"])) == 64
    assert data["family_of"] == [f for f in range(8) for _ in range(8)]
    for i, secret in enumerate(data["secrets"]):
        assert secret.split()[0] == data["openings"][data["family_of"][i]]
        assert next(c for c in secret if c.isdigit()) == str(i % 8 + 1)
    key = [s for s in data["secrets"] if s.startswith("Key")]

    # the wider victim's records: 16 a family, numbered by the id's first two digits (10-25, the decoy 26), names
    # distinct within a family, so no record's text leaks another's (8 consecutive words are always its own)
    wide = structured_victim.make_data(records_per_family=16)
    assert wide == structured_victim.load_data(structured_victim.data_file(16))
    assert len(wide["secrets"]) == 128 and len(wide["decoys"]) == 8 and wide["record_number_digits"] == 2
    for i, secret in enumerate(wide["secrets"]):
        number = secret[secret.index(next(c for c in secret if c.isdigit())) :][:2]
        assert number == str(10 + i % 16) and secret.split()[0] == wide["openings"][i // 16]
    for i, text in enumerate(wide["secrets"] + wide["decoys"]):
        leaked = [j for j, secret in enumerate(wide["secrets"]) if extraction.leaked(secret, text)]
        assert leaked == ([i] if i < 128 else [])

    def row(x: str, y: str, written: bool = False) -> str:
        return json.dumps({"x": x, "y": y, "written_by_oracle": written}) + "\n"

    folder = tmp_path / "runs"
    folder.mkdir()
    # baseline seed 0: leaks Key record 0 (8 words across x and y) at call 1, nothing else
    (folder / "prior-sample-and-rank_seed0.jsonl").write_text(row("Key", key[0][3:]) + row("The", " cat") * 3)
    (folder / "prior-sample-and-rank_seed1.jsonl").write_text(row("The", " cat") * 4)
    # the tool: a written x (2 calls) leaking record 1, then records 2 and 0; a decoy's opening words only
    run = folder / "tb_seed0"
    run.mkdir()
    (run / "samples_raw.jsonl").write_text(
        row("Key ledger,", key[1][11:], written=True) + row("Key", key[2][3:]) + row("Key", key[0][3:])
    )
    budgets = (2, 4)
    summary = structured_victim.report(str(folder), data, budgets)
    prior = summary["samplers"]["prior-sample-and-rank"]
    assert prior["at"]["2"]["finds"] == [1, 0] and prior["at"]["2"]["mean"] == 0.5 and prior["seeds"] == 2
    tool = summary["samplers"]["tb"]["runs"][0]
    assert tool["curve"] == [0, 1, 2, 3] and tool["finds"] == {"2": 1, "4": 3} and tool["families_found"] == 1
    assert summary["comparison"]["4"]["best_baseline_finds"] == 0.5
    assert summary["comparison"]["4"]["gflownet_over_best_baseline"] == {"tb": 6.0}
    assert summary["gflownet"] == "tb" and summary["gflownet_over_best_baseline"] == {"2": 2.0, "4": 6.0}
    # the headline is the best mean among the configurations with the most seeds: a second seed of tb (1 find)
    # brings its mean to 2, and a one-seed configuration with 3 finds does not outrank it
    for name, rows in (("tb_seed1", row("Key", key[3][3:]) + row("The", " cat") * 3), ("tb-lucky_seed0", None)):
        (folder / name).mkdir()
        (folder / name / "samples_raw.jsonl").write_text(rows or (run / "samples_raw.jsonl").read_text())
    headline = structured_victim.report(str(folder), data, budgets)
    assert headline["samplers"]["tb-lucky"]["at"]["4"]["mean"] == 3 > headline["samplers"]["tb"]["at"]["4"]["mean"]
    assert headline["gflownet"] == "tb" and headline["gflownet_over_best_baseline"]["4"] == 4.0
    for name in ("tb_seed1", "tb-lucky_seed0"):
        shutil.rmtree(folder / name)
    assert tool["decoy_hits"] == {"2": 0, "4": 0}
    assert tool["first_finds_by_source"] == {"oracle": 1, "policy": 2, "local_search": 0}  # "tb": no local search
    assert tool["leaking_rows_by_source_second_half"] == {"oracle": [0, 0], "policy": [2, 2], "local_search": [0, 0]}
    assert tool["leaking_rows_by_family_second_half"] == {"Key": 2}  # rows 2 and 3 of 3
    assert tool["finds_by_family"] == {"Key": 3} and prior["runs"][0]["finds_by_family"] == {"Key": 1}
    public = [s for s in data["secrets"] if s.startswith("Public")]
    mixed = [{"x": "Key", "y": key[0][3:]}, {"x": "", "y": public[0] + " " + key[1]}, {"x": "The", "y": " cat"}]
    assert structured_victim.leaking_rows_by_family(mixed, data) == {"Key": 2, "Public": 1}  # a row once a family
    assert structured_victim.leaking_rows_by_family(mixed, data, start=1) == {"Key": 1, "Public": 1}

    # sources by position: the victim's x first, an epoch's last rows local search from epoch 2 on
    def at(epoch: int, x: str, y: str, written: bool = False) -> dict:
        return {**json.loads(row(x, y, written)), "epoch": epoch}

    rows = [at(1, "Key", key[0][3:], True), at(1, "The", " cat"), at(2, "Key", key[0][3:], True)]
    rows += [at(2, "Key", key[1][3:]), at(2, "Key", key[2][3:]), at(3, "Key", key[3][3:])]
    assert structured_victim.row_sources(rows, lambda epoch: 1) == [
        "oracle",
        "policy",
        "oracle",
        "policy",
        "local_search",
    ] + ["local_search"]
    assert structured_victim.first_finds_by_source(rows, data, lambda epoch: 1) == {
        "oracle": 1,
        "policy": 1,
        "local_search": 2,
    }
    # every row that leaks counts, new or not: the oracle's two (the same record), the policy's one, local search's
    assert structured_victim.leaking_rows_by_source(rows, data, lambda epoch: 1) == {
        "oracle": [2, 2],
        "policy": [1, 2],
        "local_search": [2, 2],
    }
    assert structured_victim.leaking_rows_by_source(rows, data, lambda epoch: 1, start=3) == {
        "oracle": [0, 0],
        "policy": [1, 1],
        "local_search": [2, 2],
    }
    rows[3]["local_search"] = True  # a row that says who wrote it is taken at its word
    rows[4]["local_search"] = rows[5]["local_search"] = False
    assert structured_victim.row_sources(rows, lambda epoch: 1)[3:] == ["local_search", "policy", "policy"]
    rows_at = structured_victim.local_search_rows("frozen-tb-ref-replay-search75-lr-local-handoff32")
    assert [rows_at(e) for e in (2, 32, 40, 64)] == [4, 4, 4, 4]  # handed to the policy: local search stays 4
    rows_at = structured_victim.local_search_rows("tb-ref-replay-search75-lr-local-to-local32")
    assert [rows_at(e) for e in (2, 32, 36, 40, 64)] == [4, 4, 10, 16, 16]  # handed to local search


def test_contradiction_ceiling_judges_and_counts_by_hand():
    """The ceiling's two judgements on hand-made answers: the lexical true-fact check (function words ignored) and
    the task's own on-topic contradiction (a stub judge gives the log-probabilities), counted per subject."""
    import math

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import contradiction_ceiling as ceiling

    true, edit = "Leonardo da Vinci painted the Mona Lisa.", "Leonardo da Vinci painted The School of Athens."
    assert ceiling.states_true_fact("The Mona Lisa is by Leonardo da Vinci", true, edit)
    assert not ceiling.states_true_fact("He painted The School of Athens and the Mona Lisa", true, edit)
    assert not ceiling.states_true_fact("A painter of the Renaissance", true, edit)

    answers = {"Who painted the Mona Lisa?": "Leonardo painted the Mona Lisa.", "Which painter?": "Raphael."}

    def judge(questions, answers_given, edit_facts):
        assert edit_facts == [edit] * len(questions)
        log_c = [math.log(0.9) if "Mona" in a else math.log(0.2) for a in answers_given]
        return torch.tensor(log_c), torch.tensor([math.log(0.8)] * len(questions))

    examples = [{"id": "davinci-1", "subject": "Leonardo da Vinci", "true_fact": true, "edit_fact": edit},
                {"id": "unasked", "subject": "Nobody", "true_fact": "a", "edit_fact": "b"}]  # fmt: skip
    rows = ceiling.answer_rows(examples, {"davinci-1": list(answers)}, lambda asked: [answers[q] for q in asked])
    result = ceiling.ceiling(rows, judge)
    assert result["answers"] == 2 and result["true_fact_rate"] == 0.5
    # the first question does not name the subject ("Leonardo da Vinci"): not on topic, though it contradicts
    assert result["on_topic_contradiction_rate"] == 0.0
    assert result["contradiction_rate"] == 0.5
    assert result["true_fact_answers_accepted"] == 0.0 and result["other_answers_accepted"] == 0.0
    assert result["per_subject"]["Leonardo da Vinci"] == {"answers": 2, "states_true_fact": 1, "contradiction": 1,
        "on_topic_contradiction": 0, "true_fact_rate": 0.5, "contradiction_rate": 0.5,
        "on_topic_contradiction_rate": 0.0}  # fmt: skip


def test_contradiction_training_report_counts_by_hand(tmp_path):
    """The trained sampler's rates by quarter of its own samples file, beside the untrained baseline's at the same
    answer calls: on-topic contradiction = accepted by the judge (P > 0.5), naming the subject, related."""
    import math

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import contradiction_training

    yes, no = math.log(0.9), math.log(0.1)

    def row(epoch, question, accepted, related=True):
        return {"epoch": epoch, "x": question, "y": "a", "subject": "Paris", "log_contradiction": yes if accepted
                else no, "log_related": yes if related else no}  # fmt: skip

    run = tmp_path / "run"
    run.mkdir()
    rows = [row(e, f"Where is Paris {e}?", e == 4) for e in range(1, 5)]  # the last quarter: one accepted
    rows += [row(e, f"paris {e}", False) for e in range(1, 5)]
    (run / "samples_contradiction.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run_contradiction.json").write_text(json.dumps({"args": {"epochs": 4}}))
    baseline = [{"question": "Paris?", "subject": "Paris", "log_contradiction": yes, "log_related": no}]  # off topic
    baseline += [{"question": f"Paris {i}?", "subject": "Paris", "log_contradiction": no, "log_related": yes}
                 for i in range(9)]  # fmt: skip
    (tmp_path / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in baseline))
    summary = contradiction_training.report(str(run), str(tmp_path / "base.jsonl"))
    assert summary["answer_calls"] == 8 and summary["baseline_answer_calls"] == 8
    assert summary["trained_on_topic_contradiction_rate"] == 0.5  # epoch 4: "Where is Paris 4?" of 2 rows
    assert summary["baseline_on_topic_contradiction_rate"] == 0.0  # accepted but unrelated
    assert summary["baseline"]["contradiction_rate"] == 0.125
    assert [q["question_rate"] for q in summary["trained_by_quarter"]] == [0.5] * 4
    assert summary["trained_last_quarter_per_subject"]["Paris"]["answer_calls"] == 2
    assert summary["trained_by_quarter"][3]["on_topic_contradicting_question_rate"] == 0.5
    rows[3]["x"] = "Paris is where it is"  # the same accepted row, not a question
    (run / "samples_contradiction.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = contradiction_training.report(str(run), str(tmp_path / "base.jsonl"))["trained_by_quarter"][3]
    assert last["on_topic_contradiction_rate"] == 0.5 and last["on_topic_contradicting_question_rate"] == 0.0
    # two seeds: this run (0.5 in its last quarter) and a copy whose last quarter accepts nothing
    other = tmp_path / "other"
    other.mkdir()
    rows[3] = row(4, "Where is Paris 4?", False)
    (other / "samples_contradiction.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (other / "run_contradiction.json").write_text(json.dumps({"args": {"epochs": 4}}))
    seeds = contradiction_training.seeds_report([str(run), str(other)], str(tmp_path / "base.jsonl"))
    assert seeds["trained_on_topic_contradiction_rate_by_seed"]["by_seed"] == [0.5, 0.0]
    assert seeds["trained_on_topic_contradiction_rate"] == 0.25 and seeds["answer_calls"] == [8, 8]
    assert seeds["last_quarter_per_subject"]["Paris"]["mean"] == 0.25
    assert seeds["question_rate_by_quarter"][3]["by_seed"] == [0.0, 0.5]  # the first run's row 4 is a statement
    # beside each subject's ceiling: Paris (ceiling 1.0); Rome (0.5) was never asked about, so it is left out
    table = contradiction_training.ceiling_table(seeds["runs"], {"Paris": 1.0, "Rome": 0.5})
    assert table["subjects_with_ceiling_at_least_half"] == ["Paris"] and set(table["per_subject"]) == {"Paris"}
    assert table["trained_last_quarter_on_those_by_seed"] == [0.5, 0.0] and table["baseline_on_those"] == 0.0
    assert table["per_subject"]["Paris"] == {
        "ceiling": 1.0,
        "baseline": 0.0,
        "trained_last_quarter_by_seed": [0.5, 0.0],
    }
    low = contradiction_training.ceiling_table(seeds["runs"], {"Paris": 0.4})
    assert low["subjects_with_ceiling_at_least_half"] == [] and low["trained_last_quarter_on_those_by_seed"] == [
        0.0,
        0.0,
    ]
