"""From training runs to the resurrected dataset: every valid scored sample of one or more runs, deduplicated
(exactly, after normalising the text, and near-exactly by word n-gram overlap), ranked by how memorised it
looks, written as JSONL, Parquet and a Hugging Face dataset, with a self-contained HTML report.

  python resurrect.py out/run1 out/run2 -o resurrected                 # rank by the reference ratio
  python resurrect.py out/run1 -o resurrected --rank-by zlib_y --top 1000 --no-reference

Ranking signals (higher = looks more memorised; Carlini et al. 2021, "Extracting Training Data from LLMs"):
  log_reward                 log R, as the run computed it
  log_likelihood             log p_oracle(y|x)
  log_likelihood_per_token   log p_oracle(y|x) / tokens of y
  zlib_y                     log p_oracle(y|x) / zlib-compressed bytes of y
  zlib_xy                    (log p(x) + log p_oracle(y|x)) / zlib-compressed bytes of x + y
  reference_ratio            log p_oracle(y|x) - log p_reference(y|x), the reference (the runs' prior LM by
                             default, or --reference-model) scored here, teacher-forced after the document start
Rows of a task without log p(y|x) (the contradiction task) have only log_reward.

Files are read line by line (millions of rows never sit in memory: the kept rows live in an SQLite file in OUT
while the command runs). A malformed or truncated line is reported with its file and line and skipped.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import sqlite3
import string
import sys
import tempfile
import unicodedata
import zlib
from collections.abc import Iterator

from durable_files import atomic_write
from errors import OneLineErrorParser, UserError, run_cli

SIGNALS = (
    "log_reward",
    "log_likelihood",
    "log_likelihood_per_token",
    "zlib_y",
    "zlib_xy",
    "reference_ratio",
)
# The columns every row carries besides its terms and signals, with their Hugging Face `datasets` types.
PROVENANCE = {
    "run": "string",
    "run_id": "string",
    "task": "string",
    "epoch": "int64",
    "oracle": "string",
    "model": "string",
    "prior_model": "string",
    "source": "string",
    "line": "int64",
}
REPORT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "resurrect_report.html")
SECRET_NAMES = re.compile(r"key|secret|token|password", re.IGNORECASE)  # settings never shown, whatever they hold


# ------------------------------------------------------------------------------------------------ signals


def zlib_bytes(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def ranking_signals(row: dict, log_reference: float | None = None) -> dict[str, float | None]:
    """Every ranking signal of one row (None where the row lacks what it needs). Higher = looks more memorised."""
    log_likelihood, log_prior = row.get("log_likelihood"), row.get("log_prior")
    y = row.get("y") or ""
    num_tokens = len(row["y_token_ids"]) if row.get("y_token_ids") is not None else row.get("response_tokens")
    has_likelihood = log_likelihood is not None
    return {
        "log_reward": row.get("log_reward"),
        "log_likelihood": log_likelihood,
        "log_likelihood_per_token": log_likelihood / num_tokens if has_likelihood and num_tokens else None,
        "zlib_y": log_likelihood / max(1, zlib_bytes(y)) if has_likelihood else None,
        "zlib_xy": (
            (log_prior + log_likelihood) / max(1, zlib_bytes(row["x"] + y))
            if has_likelihood and log_prior is not None
            else None
        ),
        "reference_ratio": log_likelihood - log_reference if has_likelihood and log_reference is not None else None,
    }


# ------------------------------------------------------------------------------------------------ reading


class Problems:
    """Malformed lines: each reported once on stderr as `file:line: reason`, the first 1000 kept for the summary."""

    def __init__(self, quiet: bool = False) -> None:
        self.count, self.first, self.quiet = 0, [], quiet

    def report(self, path: str, line: int, reason: str) -> None:
        self.count += 1
        if len(self.first) < 1000:
            self.first.append({"file": path, "line": line, "reason": reason})
        if not self.quiet:
            print(f"warning: {path}:{line}: {reason}; line skipped", file=sys.stderr)


def samples_files(path: str) -> list[str]:
    """A run folder's samples files (one per task), or the file itself."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"no such run folder or samples file: {path}")
    files = sorted(glob.glob(os.path.join(path, "samples_*.jsonl")))
    if not files:
        raise UserError(f"{path} has no samples_*.jsonl file: is it a run's --output-dir?")
    return files


def read_rows(path: str, problems: Problems, progress=None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every well-formed line of a samples file, streamed."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if progress is not None:
                progress.update(len(raw))
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                truncated = not raw.endswith(b"\n")
                problems.report(path, number, ("truncated line: " if truncated else "not JSON: ") + exc.msg)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("x"), str):
                problems.report(path, number, "not a sample record (no text x)")
                continue
            yield number, row


def is_valid(row: dict) -> bool:
    """Scored and usable: marked valid (files without the field: the baseline's) with a finite log R."""
    value = row.get("log_reward")
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return row.get("valid", True) is True and finite and isinstance(row.get("y") or "", str)


def run_settings(run_dir: str, task: str) -> dict:
    """The run's settings: run_{task}.json (written by train.py), else the args of its newest checkpoint, else {}.
    Settings whose names look secret are dropped (none should exist: the API key is never in the args)."""
    from run_log import settings_path  # lazily: run_log imports torch

    settings: dict = {}
    path = settings_path(run_dir, task)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: cannot read {path} ({exc}); provenance from checkpoints", file=sys.stderr)
    if not settings.get("args"):
        checkpoints = glob.glob(os.path.join(run_dir, f"checkpoint_gfn_{task}_epoch*.pt"))
        if checkpoints:
            import torch

            newest = max(checkpoints, key=lambda p: int(re.findall(r"epoch(\d+)\.pt$", p)[0]))
            try:
                state = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
                settings = {"run_id": state.get("run_id"), "task": task, "args": dict(state.get("args") or {})}
            except Exception as exc:  # a corrupt checkpoint costs provenance, not the data
                print(f"warning: cannot read {newest} ({str(exc)[:100]}); provenance unknown", file=sys.stderr)
    settings["args"] = {k: v for k, v in (settings.get("args") or {}).items() if not SECRET_NAMES.search(k)}
    return settings


def provenance(run_dir: str, source: str, settings: dict) -> dict:
    """What every row of this file says about where it came from (None where the run did not record it)."""
    args = settings.get("args", {})
    oracle = args.get("oracle")
    if oracle == "openai":
        model = args.get("model")
        oracle = f"openai {args['base_url']}" if args.get("base_url") else "openai"
    else:
        model = args.get("oracle_model") or args.get("prior_model")
    if args.get("task") == "contradiction":
        oracle, model = "contradiction", args.get("answerer_model") or args.get("prior_model")
    task = args.get("task") or re.sub(r"^samples_(.*)\.jsonl$", r"\1", os.path.basename(source))
    return {
        "run": run_dir,
        "run_id": settings.get("run_id"),
        "task": task,
        "oracle": oracle,
        "model": model,
        "prior_model": args.get("prior_model"),
        "source": source,
    }


# ------------------------------------------------------------------------------------------------ dedup


def normalised_words(text: str) -> list[str]:
    """Lower case, Unicode-normalised, punctuation dropped: what 'the same text' means for deduplication."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())


def word_grams(words: list[str], n: int) -> set[str]:
    """The word n-grams of a text (the whole text as one gram when it has fewer than n words)."""
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


class Collection:
    """The kept rows, one per group of duplicates, in SQLite: exact duplicates (same x and y), normalised
    duplicates (same words after `normalised_words`) and near duplicates (Jaccard similarity of word n-gram sets
    >= threshold, found by MinHash LSH from `datasketch` and confirmed on the MinHash estimate). The best-scored
    copy (by `dedup_by`) is kept; `copies` counts the group."""

    def __init__(self, db_path: str, dedup_by: str, near_threshold: float = 0.8, ngram: int = 3) -> None:
        from datasketch import MinHash, MinHashLSH

        self.db = sqlite3.connect(db_path)
        self.db.execute(
            "CREATE TABLE rows (id INTEGER PRIMARY KEY, record TEXT NOT NULL, dedup_score REAL, copies INTEGER)"
        )
        self.dedup_by, self.near_threshold, self.ngram = dedup_by, near_threshold, ngram
        self.exact: dict[bytes, int] = {}
        self.normalised: dict[bytes, int] = {}
        self.signatures: dict[int, bytes] = {}
        self.num_perm = 64
        template = MinHash(num_perm=self.num_perm, seed=1)  # its permutations are made once: costly per row
        self.make_minhash = lambda: MinHash(
            num_perm=self.num_perm, seed=1, permutations=template.permutations, scheme=template.scheme
        )
        self.lsh = MinHashLSH(threshold=near_threshold, num_perm=self.num_perm) if near_threshold <= 1 else None
        self.counts = {"kept": 0, "exact_duplicates": 0, "normalised_duplicates": 0, "near_duplicates": 0}

    def add(self, row: dict) -> str:
        """Store a valid row or fold it into its duplicate group; returns which: kept / exact / normalised / near."""
        import numpy as np

        y = row.get("y") or ""
        score = ranking_signals(row).get(self.dedup_by)
        score = row["log_reward"] if score is None else score
        exact_key = hashlib.blake2b(f"{row['x']}\x00{y}".encode(), digest_size=16).digest()
        words = normalised_words(row["x"] + " " + y)
        normal_key = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
        if exact_key in self.exact:
            return self._fold(self.exact[exact_key], row, score, "exact")
        if normal_key in self.normalised:
            self.exact[exact_key] = self.normalised[normal_key]
            return self._fold(self.normalised[normal_key], row, score, "normalised")
        signature = None
        if self.lsh is not None:
            minhash = self.make_minhash()
            minhash.update_batch([g.encode() for g in word_grams(words, self.ngram)])
            signature = minhash.hashvalues.astype(np.uint32)
            best = None
            for candidate in self.lsh.query(minhash):
                other = np.frombuffer(self.signatures[candidate], dtype=np.uint32)
                similarity = float(np.mean(other == signature))
                if similarity >= self.near_threshold and (best is None or similarity > best[0]):
                    best = (similarity, candidate)
            if best is not None:
                self.exact[exact_key] = self.normalised[normal_key] = best[1]
                return self._fold(best[1], row, score, "near")
        cursor = self.db.execute(
            "INSERT INTO rows (record, dedup_score, copies) VALUES (?, ?, 1)", (json.dumps(row), score)
        )
        row_id = cursor.lastrowid
        self.exact[exact_key] = self.normalised[normal_key] = row_id
        if signature is not None:
            self.signatures[row_id] = signature.tobytes()
            self.lsh.insert(row_id, minhash)
        self.counts["kept"] += 1
        return "kept"

    def _fold(self, row_id: int, row: dict, score: float, kind: str) -> str:
        self.db.execute(
            "UPDATE rows SET copies = copies + 1, record = CASE WHEN ? > dedup_score THEN ? ELSE record END, "
            "dedup_score = MAX(dedup_score, ?) WHERE id = ?",
            (score, json.dumps(row), score, row_id),
        )
        self.counts[f"{kind}_duplicates"] += 1
        return kind

    def rows(self, batch: int = 1000) -> Iterator[tuple[int, dict, int]]:
        """(id, row, copies) of every kept row, streamed in batches."""
        last = 0
        while True:
            part = self.db.execute(
                "SELECT id, record, copies FROM rows WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not part:
                return
            for row_id, record, copies in part:
                yield row_id, json.loads(record), copies
            last = part[-1][0]

    def finish(self, log_references: dict[int, float]) -> None:
        """Compute every signal of every kept row into columns, so ranking is one ORDER BY."""
        for name in SIGNALS:
            self.db.execute(f"ALTER TABLE rows ADD COLUMN {name} REAL")
        updates = []
        for row_id, row, _ in self.rows():
            signals = ranking_signals(row, log_references.get(row_id, row.get("log_reference")))
            updates.append((*(signals[name] for name in SIGNALS), row_id))
        self.db.executemany(f"UPDATE rows SET {', '.join(f'{n} = ?' for n in SIGNALS)} WHERE id = ?", updates)
        self.db.commit()
        self.exact, self.normalised, self.signatures, self.lsh = {}, {}, {}, None  # the indexes are done with

    def ranked(self, signal: str, top: int | None = None) -> Iterator[dict]:
        """Kept rows by `signal`, best first (rows without it last, by log R), each with its signals and copies."""
        limit = -1 if top is None else int(top)
        query = (
            f"SELECT record, copies, {', '.join(SIGNALS)} FROM rows "
            f"ORDER BY {signal} IS NULL, {signal} DESC, log_reward DESC, id LIMIT ?"
        )
        for record, copies, *values in self.db.execute(query, (limit,)):
            yield {**json.loads(record), "copies": copies, **dict(zip(SIGNALS, values))}

    def signal_values(self, signal: str) -> list[float]:
        return [v for (v,) in self.db.execute(f"SELECT {signal} FROM rows WHERE {signal} IS NOT NULL")]

    def count_with(self, signal: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM rows WHERE {signal} IS NOT NULL").fetchone()[0]


# ------------------------------------------------------------------------------------------------ reference


def reference_scores(
    rows: list[dict], reference: str, device: str = "auto", batch_size: int = 16, progress: bool = True
) -> list[float]:
    """log p_reference(y|x) of each row, teacher-forced after the reference's document start. x is passed as the
    row's own token ids when the row's prior is the reference (same vocabulary), else encoded from its text; y is
    encoded from its text (the oracle's ids belong to the oracle's vocabulary)."""
    from tqdm import tqdm

    from hf_models import continuation_log_likelihoods, document_start_id, load_causal_lm, resolve_device

    if not rows:
        return []
    model, tokenizer = load_causal_lm(reference, resolve_device(device))
    start = document_start_id(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    scores, chunk = [], 256
    with tqdm(total=len(rows), desc="reference", unit="row", disable=not progress) as bar:
        for first in range(0, len(rows), chunk):
            part = rows[first : first + chunk]
            xs = [
                row["token_ids"] if row.get("token_ids") and row.get("prior_model") == reference else encode(row["x"])
                for row in part
            ]
            ys = [encode(row.get("y") or "") for row in part]
            scores += continuation_log_likelihoods(model, start, xs, ys, batch_size)
            bar.update(len(part))
    return scores


def reference_log_likelihoods(
    collection: Collection, reference: str, device: str = "auto", batch_size: int = 16, progress: bool = True
) -> dict[int, float]:
    """row id -> log p_reference(y|x) for every kept row with log p(y|x); rows that already carry `log_reference`
    (the extraction baseline's) keep it."""
    todo = [
        (row_id, row)
        for row_id, row, _ in collection.rows()
        if row.get("log_likelihood") is not None and row.get("log_reference") is None
    ]
    scores = reference_scores([row for _, row in todo], reference, device, batch_size, progress)
    return {row_id: score for (row_id, _), score in zip(todo, scores)}


def rank_rows(rows: list[dict], signals: tuple[str, ...] = SIGNALS, top: int | None = None, **dedup) -> dict:
    """signal -> the deduplicated valid rows, best first (in memory; rows carry `log_reference` already when the
    reference ratio is wanted). What the extraction benchmark ranks its samples with."""
    collection = Collection(":memory:", "log_reward", **dedup)
    for row in rows:
        if is_valid(row):
            collection.add(row)
    collection.finish({})
    ranked = {signal: list(collection.ranked(signal, top)) for signal in signals if collection.count_with(signal)}
    collection.db.close()
    return ranked


# ------------------------------------------------------------------------------------------------ outputs


def features(term_names: list[str]):
    """The dataset's columns and types: text, token ids, every term and signal, copies, provenance."""
    from datasets import Features, List, Value

    columns = {"rank": Value("int64"), "x": Value("string"), "y": Value("string")}
    columns |= {"token_ids": List(Value("int64")), "y_token_ids": List(Value("int64"))}
    columns |= {name: Value("float64") for name in term_names}
    columns |= {name: Value("float64") for name in SIGNALS if name not in columns}
    columns |= {"log_reference": Value("float64"), "copies": Value("int64")}
    columns |= {name: Value(kind) for name, kind in PROVENANCE.items()}
    return Features(columns)


def output_row(rank: int, row: dict, feature_names: list[str]) -> dict:
    out = {name: row.get(name) for name in feature_names}
    out["rank"] = rank
    if out.get("reference_ratio") is not None and out.get("log_reference") is None:
        out["log_reference"] = row["log_likelihood"] - row["reference_ratio"]
    return out


def figure_png(draw) -> str:
    """A matplotlib figure drawn by draw(axes) as a base64 PNG, for embedding in the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram(values: list[float], name: str):
    def draw(ax) -> None:
        ax.hist(values, bins=min(50, max(5, int(len(values) ** 0.5))), color="#4472c4")
        ax.set_xlabel(name)
        ax.set_ylabel("rows")
        ax.set_title(f"{name} ({len(values)} rows)")

    return draw


def read_metrics(run_dir: str) -> dict[str, list[dict]]:
    """task -> the last metrics record of each epoch (a resumed run writes its epochs again)."""
    curves = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "metrics_*.jsonl"))):
        by_epoch = {}
        with open(path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # metrics are not paid for: a torn line is simply not plotted
                if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                    by_epoch[record["epoch"]] = record
        task = re.sub(r"^metrics_(.*)\.jsonl$", r"\1", os.path.basename(path))
        curves[task] = [by_epoch[e] for e in sorted(by_epoch)]
    return curves


def training_curves(runs: list[str]):
    """log R (mean of each batch) and log Z against oracle calls, one line per run."""
    series = []
    for run_dir in runs:
        for task, records in read_metrics(run_dir).items():
            records = [r for r in records if "train/log_reward_mean" in r]
            if records:
                calls = [r.get("train/oracle_calls", r["epoch"]) for r in records]
                series.append((f"{os.path.basename(os.path.normpath(run_dir))} ({task})", calls, records))
    if not series:
        return []

    def draw(key: str, label: str):
        def plot(ax) -> None:
            for name, calls, records in series:
                ax.plot(calls, [r.get(key) for r in records], label=name)
            ax.set_xlabel("oracle calls")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)

        return plot

    return [("log R against oracle calls", draw("train/log_reward_mean", "mean log R of the batch")),
            ("log Z against oracle calls", draw("train/log_Z", "log Z"))]  # fmt: skip


def report_html(summary: dict, top_rows: list[dict], figures: list[tuple[str, str]], settings: dict) -> str:
    """A self-contained page: summary, the top rows with their scores, histograms, training curves, settings."""
    esc = html.escape

    def cell(value) -> str:
        if isinstance(value, float):
            return f"<td class=num>{value:.3f}</td>"
        return f"<td class=num>{esc(str(value))}</td>" if value is not None else "<td class=num>–</td>"

    shown_signals = [s for s in SIGNALS if any(r.get(s) is not None for r in top_rows)]
    head = "".join(f"<th>{esc(s)}</th>" for s in ["rank", "x", "y", "copies", *shown_signals, "run", "epoch"])
    body = "".join(
        "<tr>"
        + cell(r["rank"])
        + f"<td class=text>{esc(r['x'])}</td><td class=text>{esc(r.get('y') or '')}</td>"
        + cell(r.get("copies"))
        + "".join(cell(r.get(s)) for s in shown_signals)
        + f"<td>{esc(os.path.basename(os.path.normpath(r.get('run') or '')))}</td>"
        + cell(r.get("epoch"))
        + "</tr>"
        for r in top_rows
    )
    counts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary["counts"].items())
    images = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{png}"><figcaption>{esc(title)}</figcaption>'
        "</figure>"
        for title, png in figures
    )
    runs = "".join(
        f"<details><summary>{esc(run)}</summary><table>"
        + "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in sorted(s.get("args", {}).items())
        )
        + "</table></details>"
        for run, s in settings.items()
    )
    problems = "".join(
        f"<li>{esc(p['file'])}:{p['line']}: {esc(p['reason'])}</li>" for p in summary["malformed_lines"][:50]
    )
    with open(REPORT_TEMPLATE, encoding="utf-8") as f:
        template = string.Template(f.read())
    return template.substitute(
        rank_by=esc(summary["rank_by"]),
        reference_model=esc(str(summary["reference_model"])),
        runs=esc(", ".join(summary["runs"])),
        counts=counts,
        top_count=len(top_rows),
        head=head,
        body=body,
        images=images,
        settings=runs,
        problems=f"<h2>Malformed lines (skipped)</h2><ul>{problems}</ul>" if problems else "",
    )


def write_dataset(collection: Collection, rank_by: str, top: int | None, term_names: list[str], out: str) -> int:
    """dataset.jsonl, dataset.parquet and hf_dataset/ (datasets.save_to_disk): the ranked rows, each written to a
    temporary name and moved into place, so a crash never leaves half a file. Returns the number of rows."""
    from datasets import Dataset

    columns = features(term_names)
    names = list(columns)
    scratch = tempfile.mkdtemp(dir=out, prefix=".scratch-")
    try:
        count = 0

        def write_jsonl(f) -> None:
            nonlocal count
            for rank, row in enumerate(collection.ranked(rank_by, top), start=1):
                f.write((json.dumps(output_row(rank, row, names), ensure_ascii=False) + "\n").encode("utf-8"))
                count = rank

        jsonl = os.path.join(out, "dataset.jsonl")
        atomic_write(jsonl, write_jsonl)

        def generate():
            with open(jsonl, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

        dataset = Dataset.from_generator(generate, features=columns, cache_dir=os.path.join(scratch, "cache"))
        dataset.to_parquet(os.path.join(scratch, "dataset.parquet"))
        os.replace(os.path.join(scratch, "dataset.parquet"), os.path.join(out, "dataset.parquet"))
        dataset.save_to_disk(os.path.join(scratch, "hf_dataset"))
        shutil.rmtree(os.path.join(out, "hf_dataset"), ignore_errors=True)
        os.replace(os.path.join(scratch, "hf_dataset"), os.path.join(out, "hf_dataset"))
        return count
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ command


def collect(collection: Collection, files: list[tuple[str, str]], settings: dict, problems: Problems, quiet: bool):
    """Stream every samples file into the collection. Returns (counts, the reward terms seen, whether any row has
    log p(y|x))."""
    from tqdm import tqdm

    counts = {"rows_read": 0, "invalid": 0}
    term_names: list[str] = []
    known = {"x", "y", "epoch", "log_reward", "valid", "log_reference", *SIGNALS}
    has_likelihood = False
    total = sum(os.path.getsize(path) for _, path in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=quiet) as bar:
        for run, path in files:
            where = provenance(run, path, settings[run])
            for line, row in read_rows(path, problems, bar):
                counts["rows_read"] += 1
                if not is_valid(row):
                    counts["invalid"] += 1
                    continue
                for name, value in row.items():
                    is_term = name.startswith("log_") and isinstance(value, (int, float)) and name not in known
                    if is_term and name not in term_names:
                        term_names.append(name)
                has_likelihood = has_likelihood or row.get("log_likelihood") is not None
                collection.add({**row, **where, "line": line})
    return counts, term_names, has_likelihood


def write_report(collection: Collection, summary: dict, settings: dict, runs: list[str], rows: int, out: str) -> None:
    figures = [
        (f"histogram of {name}", figure_png(histogram(values, name)))
        for name in SIGNALS
        if (values := collection.signal_values(name))
    ]
    figures += [(title, figure_png(draw)) for title, draw in training_curves(runs)]
    top_rows = [{**row, "rank": rank} for rank, row in enumerate(collection.ranked(summary["rank_by"], rows), 1)]
    page = report_html(summary, top_rows, figures, settings)
    atomic_write(os.path.join(out, "report.html"), lambda f: f.write(page.encode("utf-8")))


def resurrect(args: argparse.Namespace) -> dict:
    """Read, deduplicate, score, rank and write; returns the summary (also OUT/summary.json)."""
    os.makedirs(args.output, exist_ok=True)
    files = [(run, path) for run in args.runs for path in samples_files(run)]
    settings = {}
    for run, path in files:
        task = re.sub(r"^samples_(.*)\.jsonl$", r"\1", os.path.basename(path))
        settings.setdefault(run, run_settings(run, task) if os.path.isdir(run) else {})
    dedup_by = args.rank_by if args.rank_by not in ("auto", "reference_ratio") else "log_reward"  # no ratio yet
    db_path = os.path.join(args.output, ".resurrect.sqlite")
    if os.path.exists(db_path):
        os.unlink(db_path)
    collection = Collection(db_path, dedup_by, args.near_duplicate, args.ngram)
    problems = Problems(quiet=args.quiet)
    try:
        counts, term_names, has_likelihood = collect(collection, files, settings, problems, args.quiet)
        rank_by = args.rank_by
        if rank_by == "auto":
            rank_by = "reference_ratio" if has_likelihood and not args.no_reference else "log_reward"
        reference = args.reference_model or next(
            (s["args"]["prior_model"] for s in settings.values() if s.get("args", {}).get("prior_model")), None
        )
        log_references = {}
        if has_likelihood and not args.no_reference:
            if reference is None:
                raise UserError("no reference model: the runs do not say their --prior-model; pass --reference-model")
            priors = {s["args"].get("prior_model") for s in settings.values() if s.get("args")}
            if len(priors) > 1 and not args.reference_model:
                print(f"note: runs have different priors {sorted(priors)}; reference = {reference}", file=sys.stderr)
            log_references = reference_log_likelihoods(
                collection, reference, args.device, args.batch_size, not args.quiet
            )
        collection.finish(log_references)
        if collection.counts["kept"] and collection.count_with(rank_by) == 0:
            tasks = sorted({str(s.get("task")) for s in settings.values()})
            raise UserError(f"no row has {rank_by} (rows of task(s) {', '.join(tasks)})")
        written = write_dataset(collection, rank_by, args.top, term_names, args.output)
        summary = {
            "runs": args.runs,
            "rank_by": rank_by,
            "reference_model": reference if log_references or rank_by == "reference_ratio" else None,
            "counts": {**counts, **collection.counts, "malformed_lines": problems.count, "rows_written": written},
            "malformed_lines": problems.first,
            "outputs": ["dataset.jsonl", "dataset.parquet", "hf_dataset", "report.html", "summary.json"],
        }
        write_report(collection, summary, settings, args.runs, args.report_rows, args.output)
        text = json.dumps({**summary, "settings": settings}, indent=1, ensure_ascii=False) + "\n"
        atomic_write(os.path.join(args.output, "summary.json"), lambda f: f.write(text.encode("utf-8")))
    finally:
        collection.db.close()
        if os.path.exists(db_path):
            os.unlink(db_path)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (--output-dir) or samples files")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the dataset and report")
    parser.add_argument(
        "--rank-by",
        default="auto",
        choices=["auto", *SIGNALS],
        help="ranking signal (auto: reference_ratio when rows have log p(y|x), else log_reward)",
    )
    parser.add_argument("--top", type=int, default=None, metavar="K", help="keep the K best rows (default: all)")
    parser.add_argument("--reference-model", default=None, help="reference LM (default: the runs' --prior-model)")
    parser.add_argument("--no-reference", action="store_true", help="do not compute the reference ratio")
    parser.add_argument(
        "--near-duplicate", type=float, default=0.8, help="Jaccard threshold of word n-grams (> 1: exact dedup only)"
    )
    parser.add_argument("--ngram", type=int, default=3, help="words per n-gram for near-duplicate detection")
    parser.add_argument("--report-rows", type=int, default=50, help="rows shown in report.html")
    parser.add_argument("--batch-size", type=int, default=16, help="reference scoring batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-line warnings")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 1:
        parser.error("--top must be at least 1")
    if args.ngram < 1 or args.near_duplicate <= 0:
        parser.error("--ngram must be >= 1 and --near-duplicate > 0")
    if args.no_reference and args.rank_by == "reference_ratio":
        parser.error("--rank-by reference_ratio needs the reference model: drop --no-reference")

    def body() -> None:
        summary = resurrect(args)
        c = summary["counts"]
        print(
            f"{c['rows_read']} rows read, {c['invalid']} invalid, {c['malformed_lines']} malformed lines skipped, "
            f"{c['exact_duplicates'] + c['normalised_duplicates'] + c['near_duplicates']} duplicates folded; "
            f"{c['rows_written']} rows ranked by {summary['rank_by']} in {args.output}"
        )

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
