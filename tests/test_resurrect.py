"""resurrect.py on fixture runs: reading (invalid rows, malformed and truncated lines), deduplication (exact,
normalised, near), every ranking signal against a hand computation, the outputs (JSONL, Parquet, a Hugging Face
dataset, the HTML report opened in a real browser), provenance, and that no output holds the API key."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import zlib

import pytest
import torch
from cli_helpers import read_jsonl, run_entry, run_main, tiny_flags

import resurrect

API_KEY = "sk-test-resurrect-never-write-this-0123456789"
LONG = (
    "In the quiet harbour town the fishermen mend their nets every morning while gulls circle over the "
    "grey water and the old lighthouse keeper counts the boats that leave before dawn each day of the year"
)


def encode(model_dir: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]


def sample(model_dir, x, y, log_prior, log_likelihood, epoch=1, **extra) -> dict:
    return {
        "epoch": epoch,
        "x": x,
        "token_ids": encode(model_dir, x),
        "y": y,
        "y_token_ids": encode(model_dir, y),
        "log_prior": log_prior,
        "log_likelihood": log_likelihood,
        "log_reward": log_prior + log_likelihood,
        "valid": True,
        "error": None,
        "trained": True,
        **extra,
    }


def write_run(folder, model_dir: str, rows: list, tail: str = "", run_id: str = "run-a") -> str:
    """A run folder as train.py leaves it: samples (rows may be raw strings: malformed lines), settings, metrics."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "samples_raw.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        f.write(tail)
    settings = {
        "run_id": run_id,
        "task": "raw",
        "args": {"task": "raw", "oracle": "hf", "oracle_model": model_dir, "prior_model": model_dir, "seed": 0},
    }
    settings["args"]["openai_api_key"] = API_KEY  # a secret-named setting must never reach the outputs
    with open(os.path.join(folder, "run_raw.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f)
    with open(os.path.join(folder, "metrics_raw.jsonl"), "w", encoding="utf-8") as f:
        for epoch in (1, 2, 3):
            f.write(json.dumps({"epoch": epoch, "train/oracle_calls": 4 * epoch, "train/log_reward_mean": -30.0 + epoch,
                                "train/log_Z": -5.0 + epoch}) + "\n")  # fmt: skip
    return str(folder)


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("runs")
    m = tiny_lm_dir
    run_a = write_run(
        root / "run_a",
        m,
        [
            sample(m, "The quick brown fox", " jumps over the lazy dog", -20.0, -5.0),  # line 1
            sample(m, "The quick brown fox", " jumps over the lazy dog", -20.0, -5.0, epoch=2),  # exact copy
            sample(m, "the quick brown fox!", "  Jumps over the LAZY dog.", -18.0, -4.0, epoch=3),  # normalised, best
            "{this is not json",  # line 4: malformed
            sample(m, LONG, " and nobody knows why", -60.0, -9.0),  # line 5
            sample(m, LONG.replace("year", "decade"), " and nobody knows why", -61.0, -9.5),  # near copy (J 0.95)
            sample(m, "Hello there", " general Kenobi", -12.0, -7.0),  # line 7
            {**sample(m, "broken", " reply", -3.0, 0.0), "valid": False, "error": "timeout", "log_reward": None},
            [1, 2, 3],  # line 9: JSON, but not a sample
        ],
        tail='{"epoch": 4, "x": "cut off',  # a truncated last line (no newline): a crash mid-write
    )
    run_b = write_run(
        root / "run_b",
        m,
        [
            sample(m, "Hello there", " general Kenobi", -12.0, -7.0),  # the same as run a's line 7
            sample(m, "Once upon a time", " there was a robot", -15.0, -2.0),
        ],
        run_id="run-b",
    )
    return run_a, run_b


def resurrect_into(out, *argv) -> tuple[int, str, str]:
    return run_entry(resurrect.main, [*argv, "-o", str(out), "--quiet"])


@pytest.fixture(scope="module")
def resurrected(fixture_runs, tmp_path_factory, tiny_lm_dir):
    out = tmp_path_factory.mktemp("resurrected")
    before = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = API_KEY
    try:
        code, stdout, stderr = resurrect_into(out, *fixture_runs)
    finally:
        os.environ.pop("OPENAI_API_KEY")
        if before is not None:
            os.environ["OPENAI_API_KEY"] = before
    assert code == 0, stderr
    return out, stdout


def test_minhash_estimates_the_exact_jaccard_of_word_grams():
    """The vectorised MinHasher against the slow reference: the exact Jaccard similarity of word_grams sets. With
    64 hash functions the estimate's standard error is at most sqrt(0.25 / 64) = 0.0625; over 400 pairs the mean
    error must be near 0 and no estimate off by more than 5 standard errors."""
    import random

    import numpy as np

    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(300)]
    hasher = resurrect.MinHasher(num_perm=64, ngram=3)
    errors = []
    for _ in range(400):
        text = rng.choices(vocabulary, k=rng.randint(1, 40))
        other = list(text)
        for _ in range(rng.randint(0, 10)):
            other[rng.randrange(len(other))] = rng.choice(vocabulary)
        grams, other_grams = resurrect.word_grams(text, 3), resurrect.word_grams(other, 3)
        jaccard = len(grams & other_grams) / len(grams | other_grams)
        signatures = hasher.signatures([text, other])
        errors.append(float(np.mean(signatures[0] == signatures[1])) - jaccard)
    assert abs(np.mean(errors)) < 0.01 and max(map(abs, errors)) < 5 * 0.0625
    # a signature does not depend on the batch it was computed in; short and empty texts are one gram
    texts = [rng.choices(vocabulary, k=n) for n in (0, 1, 2, 3, 7, 25)]
    together = hasher.signatures(texts)
    for i, text in enumerate(texts):
        assert (hasher.signatures([text])[0] == together[i]).all()
    assert not (together[1] == together[2]).all()
    assert (hasher.signatures([["a", "b"]]) == hasher.signatures([["a", "b"]])).all()
    assert not (hasher.signatures([["a", "b"]]) == hasher.signatures([["b", "a"]])).all()  # grams are ordered


def test_lsh_bands_find_pairs_just_above_the_threshold():
    bands, rows = resurrect.lsh_bands(0.8, 64)
    assert bands * rows <= 64

    def found(s):
        return 1 - (1 - s**rows) ** bands

    assert found(0.85) > 0.95 and found(0.3) < 0.01


@pytest.mark.parametrize("full_keys", [False, True])
def test_key_index_returns_every_row_stored_under_a_key_as_it_grows(full_keys):
    """The numpy hash table against a dict of sets, through several doublings, with keys stored under several
    rows: every true match is returned; with 32-bit slots anything else only shares the key's stored bits, with
    full keys nothing else."""
    import collections

    import numpy as np

    rng = np.random.default_rng(0)
    index = resurrect.KeyIndex(full_keys=full_keys, bits=4)
    by_key, by_stored = collections.defaultdict(set), collections.defaultdict(set)
    next_id = 0
    for _ in range(30):
        keys = rng.integers(-(2**63), 2**63 - 1, 400)
        if by_key:
            keys[:60] = rng.choice(np.array(list(by_key)), 60)  # keys already stored: several rows per key
        queries = np.concatenate([keys, rng.integers(-(2**63), 2**63 - 1, 100)])
        positions, ids = index.lookup(queries)
        found = collections.defaultdict(set)
        for position, row_id in zip(positions.tolist(), ids.tolist()):
            found[position].add(row_id)
        stored = index.stored_keys(queries).tolist()
        for position, key in enumerate(queries.tolist()):
            assert by_key[key] <= found[position] == by_stored[stored[position]]
            if full_keys:
                assert found[position] == by_key[key]
        ids = np.arange(next_id, next_id + len(keys))
        next_id += len(keys)
        index.insert(keys, ids)
        for key, stored_key, row_id in zip(keys.tolist(), index.stored_keys(keys).tolist(), ids):
            by_key[key].add(int(row_id))
            by_stored[stored_key].add(int(row_id))
    assert index.size == next_id and index.bits > 4 and (index.stored != 0).sum() == next_id


def test_batched_collection_folds_like_one_row_at_a_time():
    """add_many over a whole file and add row by row keep the same rows and count the same duplicates, including
    a duplicate of a row kept earlier in the same batch."""
    import random

    rng = random.Random(1)
    vocabulary = [f"w{i}" for i in range(50)]
    rows = []
    for i in range(300):
        if rows and rng.random() < 0.4:
            base = rng.choice(rows)
            y = base["y"].split()
            if rng.random() < 0.5:
                y[rng.randrange(len(y))] = rng.choice(vocabulary)
            rows.append({"x": base["x"], "y": " ".join(y), "log_reward": -rng.uniform(1, 9)})
        else:
            rows.append({"x": " ".join(rng.choices(vocabulary, k=4)), "y": " ".join(rng.choices(vocabulary, k=20)),
                         "log_reward": -rng.uniform(1, 9)})  # fmt: skip
    one, batched = resurrect.Collection(":memory:", "log_reward"), resurrect.Collection(":memory:", "log_reward")
    kinds = [one.add(row) for row in rows]
    assert batched.add_many(rows) == kinds
    assert one.counts == batched.counts and one.counts["near_duplicates"] > 0 and one.counts["exact_duplicates"] > 0
    assert [(r["x"], r["y"], c) for _, r, c in one.rows()] == [(r["x"], r["y"], c) for _, r, c in batched.rows()]
    best = {}
    for row, kind in zip(rows, kinds):
        if kind == "kept":
            best[len(best) + 1] = row["log_reward"]
    assert all(r["log_reward"] >= best[i] for i, r, _ in batched.rows())  # a better copy replaces the kept one


def test_counts_malformed_lines_and_duplicates(resurrected, fixture_runs):
    out, stdout = resurrected
    summary = json.load(open(out / "summary.json"))
    counts = summary["counts"]
    # 12 lines in all: 2 malformed and 1 truncated are not rows; 1 row is invalid
    assert counts["rows_read"] == 9 and counts["invalid"] == 1 and counts["malformed_lines"] == 3
    assert (counts["exact_duplicates"], counts["normalised_duplicates"], counts["near_duplicates"]) == (2, 1, 1)
    assert counts["kept"] == counts["rows_written"] == 4
    run_a_file = os.path.join(fixture_runs[0], "samples_raw.jsonl")
    assert [(p["file"], p["line"]) for p in summary["malformed_lines"]] == [(run_a_file, 4), (run_a_file, 9),
                                                                            (run_a_file, 10)]  # fmt: skip
    assert summary["malformed_lines"][2]["reason"].startswith("truncated line")
    assert "4 rows ranked by reference_ratio" in stdout


def test_best_copy_is_kept_and_copies_counted(resurrected, fixture_runs):
    out, _ = resurrected
    rows = {row["x"]: row for row in read_jsonl(out / "dataset.jsonl")}
    fox = rows["the quick brown fox!"]  # the normalised copy scored best (log R -22 against -25)
    assert fox["copies"] == 3 and fox["log_reward"] == -22.0 and fox["epoch"] == 3 and fox["line"] == 3
    harbour = rows[LONG]  # the near copy scored worse, so the first stays
    assert harbour["copies"] == 2 and harbour["log_reward"] == -69.0
    hello = rows["Hello there"]  # merged across the two runs: the first seen stays (equal scores)
    assert hello["copies"] == 2 and hello["run"] == fixture_runs[0]
    assert rows["Once upon a time"]["run"] == fixture_runs[1] and rows["Once upon a time"]["run_id"] == "run-b"
    assert {row["oracle"] for row in rows.values()} == {"hf"} and all(row["model"] for row in rows.values())


def naive_log_likelihood(model_dir: str, x_ids: list[int], y_ids: list[int]) -> float:
    """log p(y | <|endoftext|> x) one token at a time, float64: the slow reference for the batched scorer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    context, total = [encode(model_dir, "<|endoftext|>")[0], *x_ids], 0.0
    with torch.no_grad():
        for token in y_ids:
            logits = model(input_ids=torch.tensor([context])).logits[0, -1]
            total += float(torch.log_softmax(logits, dim=-1)[token])
            context.append(token)
    return total


def test_every_signal_against_a_hand_computation(resurrected, tiny_lm_dir):
    out, _ = resurrected
    row = next(r for r in read_jsonl(out / "dataset.jsonl") if r["x"] == "Once upon a time")
    y = " there was a robot"
    y_ids = encode(tiny_lm_dir, y)
    assert row["log_reward"] == -17.0 and row["log_likelihood"] == -2.0
    assert row["log_likelihood_per_token"] == pytest.approx(-2.0 / len(y_ids))
    assert row["zlib_y"] == pytest.approx(-2.0 / len(zlib.compress(y.encode())))
    assert row["zlib_xy"] == pytest.approx(-17.0 / len(zlib.compress(("Once upon a time" + y).encode())))
    reference = naive_log_likelihood(tiny_lm_dir, encode(tiny_lm_dir, "Once upon a time"), y_ids)
    assert row["log_reference"] == pytest.approx(reference, abs=1e-6)
    assert row["reference_ratio"] == pytest.approx(-2.0 - reference, abs=1e-6)


def test_rows_are_ranked_by_the_chosen_signal_and_cut(fixture_runs, tmp_path):
    for signal in ("log_reward", "zlib_y", "log_likelihood_per_token"):
        code, _, err = resurrect_into(tmp_path / signal, *fixture_runs, "--rank-by", signal, "--top", "3")
        assert code == 0, err
        rows = read_jsonl(tmp_path / signal / "dataset.jsonl")
        assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
        values = [r[signal] for r in rows]
        assert values == sorted(values, reverse=True)
    by_reward = [r["x"] for r in read_jsonl(tmp_path / "log_reward" / "dataset.jsonl")]
    assert by_reward == ["Once upon a time", "Hello there", "the quick brown fox!"]


def test_worker_processes_write_what_one_process_writes(fixture_runs, tmp_path):
    """--workers 2 (spawned processes parse, hash and write the JSON lines, in small chunks) against --workers 0:
    the same rows, ranks, copies, signals and counts, the malformed lines reported at the same places."""
    outputs = {}
    for workers in ("0", "2"):
        code, _, err = resurrect_into(tmp_path / workers, *fixture_runs, "--workers", workers, "--no-reference")
        assert code == 0, err
        summary = json.load(open(tmp_path / workers / "summary.json"))
        outputs[workers] = (read_jsonl(tmp_path / workers / "dataset.jsonl"), summary["counts"],
                            summary["malformed_lines"])  # fmt: skip
    assert outputs["0"] == outputs["2"] and len(outputs["0"][0]) == 4


def test_parquet_and_hf_dataset_hold_every_column(resurrected):
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    out, _ = resurrected
    jsonl = read_jsonl(out / "dataset.jsonl")
    dataset = load_from_disk(str(out / "hf_dataset"))
    table = pq.read_table(out / "dataset.parquet")
    assert len(dataset) == table.num_rows == len(jsonl) == 4
    columns = ["x", "y", "token_ids", "y_token_ids", "log_prior", "log_likelihood", "log_reward", "zlib_xy"]
    columns += ["reference_ratio", "copies", "run", "run_id", "epoch", "oracle", "model", "source", "line"]
    for column in columns:
        assert column in dataset.column_names and column in table.column_names
    assert dataset[0] == jsonl[0]
    assert [r["x"] for r in dataset] == [r["x"] for r in jsonl]


def test_no_output_holds_the_api_key(resurrected):
    out, _ = resurrected
    files = [p for p in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert len(files) >= 5
    for path in files:
        assert API_KEY.encode() not in open(path, "rb").read(), path


def test_html_report_opens_in_a_real_browser_with_its_images(resurrected):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    out, _ = resurrected
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"file://{out / 'report.html'}")
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
        rows = page.eval_on_selector_all("#top-rows tbody tr", "els => els.length")
        first_x = page.inner_text("#top-rows tbody tr:first-child td.text")
        # sort and filter in the page (plain JavaScript, no network): the x column, then a rank column
        xs = "els => els.filter(e => !e.closest('tr').hidden).map(e => e.innerText)"
        x_cells = "#top-rows tbody tr td:nth-child(2)"
        page.click("#top-rows thead th:nth-child(2)")  # x, descending first
        descending = page.eval_on_selector_all(x_cells, xs)
        page.click("#top-rows thead th:nth-child(2)")
        ascending = page.eval_on_selector_all(x_cells, xs)
        page.click("#top-rows thead th:nth-child(1)")  # rank, numeric: 4, 3, 2, 1
        ranks = page.eval_on_selector_all("#top-rows tbody tr td:nth-child(1)", "els => els.map(e => e.innerText)")
        page.fill("#filter", first_x[:6].upper())  # case-insensitive, over x and y
        filtered = page.eval_on_selector_all(
            "#top-rows tbody tr",
            "rows => rows.filter(r => !r.hidden).map(r => [...r.querySelectorAll('td.text')].map(c => c.innerText)"
            ".join(' '))",
        )
        shown = page.inner_text("#shown")
        browser.close()
    assert ascending == sorted(ascending, key=str.lower) and descending == ascending[::-1] and len(ascending) == 4
    assert ranks == ["4", "3", "2", "1"]
    assert 1 <= len(filtered) < 4 and all(first_x[:6].lower() in text.lower() for text in filtered)
    assert shown == f"{len(filtered)} of 4 rows shown"
    names = [alt for alt, _, _ in images]
    for signal in resurrect.SIGNALS:
        assert f"histogram of {signal}" in names
    assert "log R against oracle calls" in names and "log Z against oracle calls" in names
    assert all(complete and width > 100 for _, complete, width in images), images
    assert rows == 4 and first_x  # the top rows, with their text


def test_rows_without_a_likelihood_rank_by_log_reward(tmp_path, tiny_lm_dir):
    rows = [
        {"epoch": 1, "x": "Is the tower in Rome?", "y": "Yes.", "log_contradiction": -0.1, "log_question": -9.0,
         "log_reward": -9.1, "valid": True},
        {"epoch": 1, "x": "Where is the tower?", "y": "In Paris.", "log_contradiction": -3.0, "log_question": -8.0,
         "log_reward": -11.0, "valid": True},
    ]  # fmt: skip
    run = write_run(tmp_path / "contradiction", tiny_lm_dir, rows)
    code, stdout, err = resurrect_into(tmp_path / "out", run)
    assert code == 0, err
    ranked = read_jsonl(tmp_path / "out" / "dataset.jsonl")
    assert [r["x"] for r in ranked] == ["Is the tower in Rome?", "Where is the tower?"]
    assert ranked[0]["log_contradiction"] == -0.1 and ranked[0]["reference_ratio"] is None
    assert "ranked by log_reward" in stdout
    code, _, err = resurrect_into(tmp_path / "out2", run, "--rank-by", "zlib_y")
    assert code == 2 and err.strip().startswith("error: no row has zlib_y") and len(err.strip().splitlines()) == 1


def test_user_mistakes_are_one_line_errors(tmp_path, fixture_runs):
    for argv, words in (
        ([str(tmp_path / "missing")], "no such run folder"),
        ([str(tmp_path)], "no samples_*.jsonl"),
        ([*fixture_runs, "--top", "0"], "--top"),
        ([*fixture_runs, "--no-reference", "--rank-by", "reference_ratio"], "reference"),
        ([*fixture_runs, "--rank-by", "perplexity"], "invalid choice"),
        ([*fixture_runs, "--reference-model", str(tmp_path / "no-such-model")], "cannot load model"),
    ):
        code, _, err = resurrect_into(tmp_path / "out", *argv)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_real_training_run_is_resurrected_with_its_provenance(tmp_path, tiny_lm_dir):
    run = tmp_path / "run"
    code, err = run_main(tiny_flags(tiny_lm_dir, run, "--epochs", "3", "--save-every", "3"))
    assert code == 0, err
    settings = json.load(open(run / "run_raw.json"))
    assert settings["run_id"] and settings["args"]["prior_model"] == tiny_lm_dir and settings["task"] == "raw"
    samples = read_jsonl(run / "samples_raw.jsonl")
    code, _, err = resurrect_into(tmp_path / "out", str(run), "--near-duplicate", "1.5")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "out" / "dataset.jsonl")
    distinct = {(s["x"], s["y"]) for s in samples if s["valid"]}
    normalised = {(" ".join(resurrect.normalised_words(x + " " + y))) for x, y in distinct}
    assert len(rows) == len(normalised) and sum(r["copies"] for r in rows) == sum(s["valid"] for s in samples)
    assert all(r["run_id"] == settings["run_id"] and r["oracle"] == "hf" and r["model"] == tiny_lm_dir for r in rows)
    assert all(math.isfinite(r["reference_ratio"]) for r in rows)  # the prior is the reference: x by its own ids
