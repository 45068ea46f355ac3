"""What the command-line tests share: run an entry point with its output captured, read the JSONL a run writes."""

from __future__ import annotations

import contextlib
import io
import json

import train


def tiny_flags(model_dir: str, output_dir, *extra: str) -> list[str]:
    """A seconds-long CPU run: a tiny transformer policy over a tiny local LM that is also the oracle. Later
    flags in `extra` override these (argparse keeps the last)."""
    return [
        "--prior-model",
        model_dir,
        "--oracle",
        "hf",
        "--d-model",
        "32",
        "--num-layers",
        "1",
        "--max-len",
        "6",
        "--batch-size",
        "4",
        "--max-response-tokens",
        "5",
        "--output-dir",
        str(output_dir),
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        "7",
        *extra,
    ]


def run_entry(entry, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of entry(argv); argparse's SystemExit counts as an exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def run_main(argv: list[str], entry=train.main) -> tuple[int, str]:
    """(exit code, stderr) of a training entry point (train.main by default)."""
    code, _, err = run_entry(entry, argv)
    return code, err


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
