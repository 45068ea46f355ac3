"""convert_data.py (CounterFact / CSV / task JSONL -> task JSONL) and download_models.py, on small files written
here. Nothing is downloaded: the hub is offline (conftest sets HF_HUB_OFFLINE=1)."""

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import read_jsonl, run_entry

import convert_data
import download_models
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DATA = os.path.join(ROOT, "data", "contradiction_example.jsonl")


def run_main(argv: list[str], entry=convert_data.main) -> tuple[int, str, str]:
    return run_entry(entry, argv)


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def counterfact_record(
    case_id, subject="Danielle Darrieux", prompt="The mother tongue of {} is", true="French", new="English", **extra
) -> dict:
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "subject": subject,
            "prompt": prompt,
            "relation_id": "P103",
            "target_true": {"str": true, "id": "Q150"},
            "target_new": {"str": new, "id": "Q1860"},
        },
        "paraphrase_prompts": ["ignored"],
        **extra,
    }


# ------------------------------------------------------------------------------------------------ conversions


def test_counterfact_json_list_becomes_edit_and_true_facts(tmp_path):
    path = write(
        tmp_path / "cf.json",
        json.dumps(
            [
                counterfact_record(0),
                counterfact_record(
                    7, subject=" Apple  A5 ", prompt="{} was created by", true="Apple Inc.", new="Google "
                ),
            ]
        ),
    )
    assert convert_data.convert(path) == [
        {
            "id": "0",
            "subject": "Danielle Darrieux",
            "edit_fact": "The mother tongue of Danielle Darrieux is English.",
            "true_fact": "The mother tongue of Danielle Darrieux is French.",
        },
        {
            "id": "7",
            "subject": "Apple A5",
            "edit_fact": "Apple A5 was created by Google.",
            "true_fact": "Apple A5 was created by Apple Inc.",
        },  # no doubled period, no doubled spaces
    ]


def test_counterfact_jsonl_without_case_ids_is_numbered_by_record(tmp_path):
    first, second = (
        counterfact_record(None),
        counterfact_record(None, subject="Paris", prompt="{} is the capital of", true="France", new="Italy"),
    )
    path = write(tmp_path / "cf.jsonl", jsonl(first) + "\n" + jsonl(second))  # a blank line in between
    examples = convert_data.convert(path)
    assert [e["id"] for e in examples] == ["1", "2"]
    assert examples[1]["edit_fact"] == "Paris is the capital of Italy."


def test_flat_counterfact_with_plain_string_targets(tmp_path):
    path = write(
        tmp_path / "flat.jsonl",
        jsonl(
            {
                "case_id": "a",
                "subject": "Jupiter",
                "prompt": "{} orbits",
                "target_true": "the Sun",
                "target_new": "Mars",
            },
            {"subject": "Mars", "prompt": "{} is named after", "target_new": {"str": "Zeus"}},  # no target_true, no id
        ),
    )
    assert convert_data.convert(path) == [
        {"id": "a", "subject": "Jupiter", "edit_fact": "Jupiter orbits Mars.", "true_fact": "Jupiter orbits the Sun."},
        {"id": "2", "subject": "Mars", "edit_fact": "Mars is named after Zeus."},
    ]


def test_csv_with_header(tmp_path):
    path = write(
        tmp_path / "edits.csv",
        "\ufeffid,subject,edit_fact,true_fact\n"  # a byte-order mark, as spreadsheets write
        'x1,Marie Curie,"Marie Curie was born in Vienna, Austria.",Marie Curie was born in Warsaw.\n'
        "\n"
        ",Jupiter,Jupiter has no moons.,\n",
    )
    assert convert_data.convert(path) == [
        {
            "id": "x1",
            "subject": "Marie Curie",
            "edit_fact": "Marie Curie was born in Vienna, Austria.",
            "true_fact": "Marie Curie was born in Warsaw.",
        },
        {"id": "2", "subject": "Jupiter", "edit_fact": "Jupiter has no moons."},  # blank id and true_fact: absent
    ]


def test_task_jsonl_passes_through_normalised(tmp_path):
    records = [
        {
            "id": "a",
            "subject": "Isaac Newton",
            "edit_fact": "Isaac Newton was born in Scotland.",
            "true_fact": "Isaac Newton was born in England.",
            "prompt": "Ask about Newton:",
        },
        {"id": 5, "subject": "  Jupiter\n", "edit_fact": "Jupiter  is small.", "true_fact": None, "note": "x"},
    ]
    path = write(tmp_path / "task.jsonl", jsonl(*records))
    assert convert_data.convert(path) == [
        records[0],
        {"id": "5", "subject": "Jupiter", "edit_fact": "Jupiter is small."},
    ]
    assert convert_data.load_examples(path) == convert_data.convert(path)


def test_cli_writes_output_with_limit_and_leaves_no_temp_file(tmp_path):
    src = write(tmp_path / "cf.json", json.dumps([counterfact_record(i) for i in range(5)]))
    out = tmp_path / "out" / "task.jsonl"
    code, stdout, stderr = run_main([src, str(out), "--limit", "3"])
    assert (code, stdout, stderr) == (0, f"wrote 3 examples to {out}\n", "")
    assert [e["id"] for e in read_jsonl(out)] == ["0", "1", "2"]
    assert os.listdir(out.parent) == ["task.jsonl"]
    assert convert_data.load_examples(str(out)) == read_jsonl(out)


# ------------------------------------------------------------------------------------------------- errors

CF_NO_PLACEHOLDER = json.dumps(
    [counterfact_record(1), counterfact_record(2), counterfact_record(3, prompt="The mother tongue is")]
)
CF_NO_TARGET = jsonl({"case_id": 1, "requested_rewrite": {"subject": "S", "prompt": "{} is", "target_true": "a"}})
TASK_OK = {"id": "a", "subject": "S", "edit_fact": "S is T."}

MALFORMED = [
    ("data.jsonl", jsonl(TASK_OK, {"id": "b", "edit_fact": "S is U."}), "line 2: missing field 'subject'"),
    ("cf.json", CF_NO_PLACEHOLDER, "record 3: requested_rewrite.prompt has no '{}' placeholder"),
    ("cf.jsonl", CF_NO_TARGET, "line 1: missing field 'requested_rewrite.target_new'"),
    ("cf.jsonl", jsonl(counterfact_record(1), {"case_id": 2}), "line 2: missing field 'requested_rewrite'"),
    (
        "data.jsonl",
        jsonl(TASK_OK) + '{"id": "b" "subject": "S"}\n',
        "line 2: malformed JSON: Expecting ',' delimiter (column 12)",
    ),
    (
        "data.jsonl",
        jsonl(TASK_OK, {"id": "b", "subject": "S", "edit_fact": "  "}),
        "line 2: field 'edit_fact' is empty",
    ),
    ("data.jsonl", jsonl({"subject": 3, "edit_fact": "x"}), "line 1: field 'subject' must be a string, got number"),
    (
        "data.jsonl",
        jsonl(TASK_OK, {**TASK_OK, "true_fact": ["x"]}),
        "line 2: field 'true_fact' must be a string, got array",
    ),
    ("data.jsonl", jsonl({**TASK_OK, "id": 1.5}), "line 1: field 'id' must be a string or an integer, got number"),
    ("data.jsonl", jsonl(TASK_OK, {**TASK_OK, "id": "b"}, TASK_OK), "line 3: duplicate id 'a' (also line 1)"),
    ("data.jsonl", jsonl(["S", "S is T."]), "line 1: expected a JSON object, got array"),
    (
        "data.json",
        json.dumps({"subject": "S"}),
        ": expected a JSON list of records, got object (for one record a line, name the file .jsonl)",
    ),
    ("data.json", "[{]", ": malformed JSON at line 1 column 3: Expecting property name enclosed in double quotes"),
    ("data.csv", "subject,true_fact\nS,S is T.\n", "line 1: missing column 'edit_fact'"),
    ("data.csv", "subject,edit_fact\nS,S is T.\nS,S is U.,extra\n", "line 3: expected 2 cells like the header, got 3"),
    ("data.csv", "id,subject,edit_fact\na,S,S is T.\na,S,S is U.\n", "line 3: duplicate id 'a' (also line 2)"),
    ("data.csv", 'subject,edit_fact\nS,S is T.\n"S,S is U.\n', "line 3: malformed CSV: unexpected end of data"),
    ("data.jsonl", "\n\n", ": no examples"),
    ("data.txt", "S,S is T.\n", ": unsupported file type '.txt': expected .json, .jsonl or .csv"),
]


@pytest.mark.parametrize("name, content, message", MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_input_is_one_line_exit_2_naming_place_and_field(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")
    separator = "" if message.startswith(":") else " "
    assert run_main([path, str(out)]) == (2, "", f"error: {path}{separator}{message}\n")
    assert out.read_text() == "previous contents\n"  # a failed conversion leaves the old output alone
    assert sorted(os.listdir(tmp_path)) == sorted([name, "out.jsonl"])  # and no temp file


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--limit", "0"], "--limit must be at least 1, got 0"),
        (["--limit", "x"], "argument --limit: invalid int value: 'x' (see --help)"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, argv_tail, message):
    path = write(tmp_path / "data.jsonl", jsonl(TASK_OK))
    assert run_main([path, str(tmp_path / "out.jsonl"), *argv_tail]) == (2, "", f"error: {message}\n")


def test_missing_input_and_non_jsonl_output(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    assert run_main([missing, str(tmp_path / "o.jsonl")]) == (2, "", f"error: input file not found: {missing}\n")
    path = write(tmp_path / "data.jsonl", jsonl(TASK_OK))
    assert run_main([path, "o.csv"]) == (2, "", "error: output must be a .jsonl file: o.csv\n")


def test_failed_write_keeps_old_output_and_removes_temp_file(tmp_path, monkeypatch):
    path = write(tmp_path / "data.jsonl", jsonl(TASK_OK))
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_data.os, "replace", failing_replace)
    assert run_main([path, str(out)]) == (2, "", f"error: cannot write {out}: No space left on device\n")
    assert out.read_text() == "previous contents\n"
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "out.jsonl"]


def test_load_examples_refuses_counterfact_and_names_the_fix(tmp_path):
    path = write(tmp_path / "cf.jsonl", jsonl(counterfact_record(0)))
    with pytest.raises(UserError, match=r"cf\.jsonl line 1: a CounterFact record, not the task format: convert"):
        convert_data.load_examples(path)


def test_cli_subprocess_success_and_one_line_error(tmp_path):
    good = write(tmp_path / "cf.json", json.dumps([counterfact_record(0)]))
    bad = write(tmp_path / "bad.jsonl", jsonl({"id": "a", "edit_fact": "x"}))
    out = tmp_path / "out.jsonl"
    run = [sys.executable, os.path.join(ROOT, "convert_data.py")]
    proc = subprocess.run([*run, good, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"wrote 1 example to {out}\n", "")
    proc = subprocess.run([*run, bad, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"error: {bad} line 1: missing field 'subject'\n"
    assert read_jsonl(out)[0]["id"] == "0"  # the earlier output survived the failed run


# --------------------------------------------------------------------------------------- the shipped dataset


def test_shipped_example_dataset():
    """The 24 subjects whose answer the answerer knows (benchmarks/contradiction_ceiling.py): five of the first 12
    with their three edits each, 19 more with one."""
    examples = convert_data.load_examples(EXAMPLE_DATA)
    assert len(examples) == 34
    assert len({e["id"] for e in examples}) == 34
    subjects = {}
    for example in examples:
        subjects.setdefault(example["subject"], []).append(example)
    assert len(subjects) == 24 and sorted(len(edits) for edits in subjects.values()) == [1] * 19 + [3] * 5
    for example in examples:
        assert example["true_fact"] and example["edit_fact"] != example["true_fact"]
        assert example["edit_fact"].endswith(".") and example["true_fact"].endswith(".")
    assert convert_data.convert(EXAMPLE_DATA) == examples  # already normalised: conversion changes nothing


# ------------------------------------------------------------------------------------------ download_models


def test_download_error_offline_is_one_line(tmp_path):
    model_id = "no-such-org/no-such-model-for-tests"
    code, stdout, stderr = run_main(["--sampler", model_id, "--cache-dir", str(tmp_path)], entry=download_models.main)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"error: cannot download {model_id}: ") and stderr.count("\n") == 1
    assert "HF_HUB_OFFLINE is set" in stderr


def test_download_accepts_local_folders_without_copying(tiny_lm_dir, tmp_path):
    cache = tmp_path / "cache"
    argv = [
        "--sampler",
        tiny_lm_dir,
        "--nli-model",
        tiny_lm_dir,
        "--prior-model",
        tiny_lm_dir,
        "--cache-dir",
        str(cache),
    ]
    code, stdout, stderr = run_main(argv, entry=download_models.main)
    assert (code, stderr) == (0, "")
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sampler", "base-model", "nli-model", "prior-model"]
    assert (
        lines[-1]
        == f"prior-model: {tiny_lm_dir} is already local ({os.path.abspath(tiny_lm_dir)}), nothing to download"
    )
    assert not cache.exists()  # nothing fetched or copied


def test_download_rejects_missing_or_non_model_folders(tmp_path):
    missing = str(tmp_path / "missing")
    code, _, stderr = run_main(["--prior-model", missing, "--sampler", str(tmp_path)], entry=download_models.main)
    assert code == 2
    assert stderr == f"error: cannot use local folder {tmp_path}: it has no config.json, so it is not a saved model\n"
    code, _, stderr = run_main(["--sampler", missing], entry=download_models.main)
    assert (code, stderr) == (2, f"error: cannot download {missing}: no such local folder or .gguf file\n")
