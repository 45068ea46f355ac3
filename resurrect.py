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
import collections
import ctypes
import dataclasses
import glob
import hashlib
import html
import io
import itertools
import json
import math
import multiprocessing
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
from concurrent.futures import ProcessPoolExecutor

import orjson

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


def parse_line(raw: bytes) -> tuple[dict | None, str]:
    """(row, its JSON text) of one samples-file line, or (None, why it is not a sample record)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8: {exc.reason}"
    try:
        row = orjson.loads(raw)  # 4x json's speed; it refuses NaN and Infinity, which Python's json wrote
    except orjson.JSONDecodeError:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, ("not JSON: " if raw.endswith(b"\n") else "truncated line: ") + exc.msg
    if not isinstance(row, dict) or not isinstance(row.get("x"), str):
        return None, "not a sample record (no text x)"
    return row, text


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


def normalised_text(text: str) -> str:
    """normalised_words as one string: the key under which two x count as the same find (or the same paid x)."""
    return " ".join(normalised_words(text))


def word_grams(words: list[str], n: int) -> set[str]:
    """The word n-grams of a text (the whole text as one gram when it has fewer than n words)."""
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for MinHash LSH at a Jaccard threshold: the split of num_perm that minimises the
    area of false positives below the threshold plus 9x that of false negatives above it (datasketch weighs them
    equally, which at 0.8 and 64 permutations finds a pair of similarity 0.85 only 60% of the time; here 97%:
    a false positive only costs comparing two signatures). A pair of similarity s shares at least one band with
    probability 1 - (1 - s^rows)^bands."""
    import numpy as np

    def error(bands: int, rows: int) -> float:
        below, above = np.linspace(0, threshold, 101), np.linspace(threshold, 1, 101)
        p_below, p_above = 1 - (1 - below**rows) ** bands, 1 - (1 - above**rows) ** bands
        return float(0.1 * np.trapezoid(p_below, below) + 0.9 * np.trapezoid(1 - p_above, above))

    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    return min(pairs, key=lambda pair: error(*pair))


class MinHasher:
    """MinHash signatures of word n-gram sets, a batch of texts at a time in numpy: each word hashed once (crc32),
    each n-gram a wrapping polynomial of its words' hashes, each of num_perm hash functions a multiply-shift
    ((a h + b) mod 2^64) >> 32 with odd 64-bit a, and the minimum per text by one reduceat. The same text has the
    same signature in any process (the workers that hash for `collect`)."""

    def __init__(self, num_perm: int = 64, ngram: int = 3, seed: int = 1) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        self.word_weights = rng.integers(0, 1 << 63, ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def signatures(self, texts: list[list[str]]):
        """(len(texts), num_perm) uint32: one signature per text, a list of words (an empty text is one empty
        word, so one gram, as in word_grams)."""
        import numpy as np

        texts = [words or [""] for words in texts]
        lengths = np.fromiter(map(len, texts), np.int64, len(texts))
        words = np.fromiter(map(zlib.crc32, map(str.encode, itertools.chain.from_iterable(texts))), np.uint64)
        text_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
        offset = np.arange(len(words)) - text_start  # each word's position in its text
        length = np.repeat(lengths, lengths)
        padded = np.concatenate([words, np.zeros(self.ngram, np.uint64)])
        grams = np.zeros(len(words), np.uint64)
        with np.errstate(over="ignore"):  # every product and sum wraps modulo 2^64 on purpose
            for k in range(self.ngram):  # the gram starting at each word: its next n words within its text
                inside = (offset + k < length).astype(np.uint64)
                grams += padded[k : k + len(words)] * inside * self.word_weights[k]
            # a text of n words or more has len - n + 1 grams; a shorter one, one gram of all its words
            starts_gram = offset <= np.maximum(length - self.ngram, 0)
            grams = grams[starts_gram]
            permuted = self.a[:, None] * grams[None, :]  # (num_perm, grams): reduceat runs along contiguous rows
            permuted += self.b[:, None]
        permuted >>= np.uint64(32)
        counts = np.maximum(lengths - self.ngram + 1, 1)
        return np.minimum.reduceat(permuted, np.cumsum(counts) - counts, axis=1).T.astype(np.uint32)


def digest64(text: str) -> int:
    """A 64-bit key of a text (blake2b), as a signed int (what KeyIndex takes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


class KeyIndex:
    """64-bit key -> the kept rows stored under it, for millions of rows in little memory: an open-addressing hash
    table in numpy (linear probing, grown x2 past 60% full), looked up and filled a batch at a time. A lookup
    returns every entry on the key's probe path that matches it (several rows may share a key).

    `full_keys`: each slot holds the whole key (12 bytes a slot), for the exact and normalised digests, where a
    false match would fold two different texts. Otherwise a slot holds the key's low 32 bits (8 bytes a slot),
    for the LSH bands: keys that agree on them match each other (about 1 in 4 billion per probe), and every
    candidate is confirmed on its MinHash signature anyway."""

    def __init__(self, full_keys: bool = False, bits: int = 16) -> None:
        import numpy as np

        self.full_keys, self.bits = full_keys, bits
        self.dtype = np.uint64 if full_keys else np.uint32
        self.stored = np.zeros(1 << bits, self.dtype)  # 0: an empty slot (keys are made non-zero)
        self.ids = np.zeros(1 << bits, np.int32)
        self.size = 0

    def stored_keys(self, keys):
        """What a slot holds for each key: the key or its low 32 bits, with the lowest bit set (never 0)."""
        import numpy as np

        keys = np.asarray(keys, np.int64).view(np.uint64)
        if not self.full_keys:
            keys = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        return keys | self.dtype(1)

    def _home(self, stored):
        import numpy as np

        with np.errstate(over="ignore"):  # Fibonacci hashing: the top bits of a wrapping product
            return (stored.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - self.bits)

    def lookup(self, keys) -> tuple:
        """(position in keys, row id) of every stored entry that matches one of the keys."""
        import numpy as np

        wanted = self.stored_keys(keys)
        mask = np.uint64(len(self.ids) - 1)
        active, slots = np.arange(len(wanted)), self._home(wanted)
        found_at, found_ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
        while len(active):
            stored = self.stored[slots]
            hit = stored == wanted[active]
            found_at.append(active[hit])
            found_ids.append(self.ids[slots[hit]])
            going = stored != 0  # an empty slot ends a probe path
            active, slots = active[going], (slots[going] + np.uint64(1)) & mask
        return np.concatenate(found_at), np.concatenate(found_ids)

    def insert(self, keys, ids) -> None:
        import numpy as np

        stored, ids = self.stored_keys(keys), np.asarray(ids, np.int32)
        if (self.size + len(ids)) * 5 > len(self.ids) * 3:
            used = self.stored != 0
            old_stored, old_ids = self.stored[used], self.ids[used]
            while (self.size + len(ids)) * 5 > (1 << self.bits) * 3:
                self.bits += 1
            self.stored, self.ids = np.zeros(1 << self.bits, self.dtype), np.zeros(1 << self.bits, np.int32)
            self._place(old_stored, old_ids)
        self._place(stored, ids)
        self.size += len(ids)

    def _place(self, stored, ids) -> None:
        import numpy as np

        mask = np.uint64(len(self.ids) - 1)
        slots = self._home(stored)
        while len(ids):
            empty = np.flatnonzero(self.stored[slots] == 0)
            # entries aiming at one empty slot: the last write wins it (read back below); the others probe on
            self.ids[slots[empty]] = empty
            won = empty[self.ids[slots[empty]] == empty]
            self.stored[slots[won]], self.ids[slots[won]] = stored[won], ids[won]
            left = np.ones(len(ids), bool)
            left[won] = False
            stored, ids, slots = stored[left], ids[left], (slots[left] + np.uint64(1)) & mask


def stored_row(record: str, where: dict, line: int | None) -> dict:
    """A stored row with its file's provenance and its line number."""
    try:
        row = {**orjson.loads(record), **where}
    except orjson.JSONDecodeError:  # NaN or Infinity in it (see parse_line)
        row = {**json.loads(record), **where}
    if line is not None:
        row["line"] = line
    return row


def ranked_row(record: str, where: dict, line: int | None, copies: int, values) -> dict:
    return {**stored_row(record, where, line), "copies": copies, **dict(zip(SIGNALS, values))}


@dataclasses.dataclass
class Prepared:
    """A batch of valid rows, hashed and scored, ready to be folded into a Collection in order: all the per-row
    work that does not depend on the rows kept so far (so worker processes can do it)."""

    texts: list[str]  # each row's JSON, stored as it is
    lines: list  # line numbers (None: not from a file)
    exact_keys: list[int]  # digest64 of x and y
    normal_keys: list[int]  # digest64 of the normalised words
    signals: list[tuple]  # ranking_signals, in SIGNALS order
    scores: list[float]  # the dedup score (the best-scored copy of a group is the one kept)
    signatures: object = None  # (rows, num_perm) uint32 MinHash signatures, None when near dedup is off
    band_keys: object = None  # (rows, bands) int64: each row's LSH band keys


class RowHasher:
    """What `Prepared` holds, for a batch of rows: the two digests, the MinHash signature and its LSH band keys
    (`lsh_bands` for the threshold), every ranking signal and the dedup score."""

    NUM_PERM = 64

    def __init__(self, dedup_by: str, near_threshold: float = 0.8, ngram: int = 3) -> None:
        self.dedup_by, self.near_threshold = dedup_by, near_threshold
        self.near = near_threshold <= 1
        self.minhasher = MinHasher(self.NUM_PERM, ngram)
        self.num_bands, self.band_rows = lsh_bands(near_threshold, self.NUM_PERM) if self.near else (0, 0)

    def prepare(self, rows: list[dict], texts: list[str] | None = None, lines: list | None = None) -> Prepared:
        import numpy as np

        words = [normalised_words(row["x"] + " " + (row.get("y") or "")) for row in rows]
        signals = [ranking_signals(row, row.get("log_reference")) for row in rows]
        prepared = Prepared(
            texts=texts or [json.dumps(row) for row in rows],
            lines=lines or [None] * len(rows),
            exact_keys=[digest64(f"{row['x']}\x00{row.get('y') or ''}") for row in rows],
            normal_keys=[digest64(" ".join(w)) for w in words],
            signals=[tuple(values[name] for name in SIGNALS) for values in signals],
            scores=[
                row["log_reward"] if values.get(self.dedup_by) is None else values[self.dedup_by]
                for row, values in zip(rows, signals)
            ],
        )
        if self.near and rows:
            signatures = self.minhasher.signatures(words)
            with np.errstate(over="ignore"):  # a wrapping polynomial of each band's values: its LSH key
                weights = self.minhasher.word_weights[0] ** np.arange(1, self.band_rows + 1, dtype=np.uint64)
                used = signatures[:, : self.num_bands * self.band_rows].astype(np.uint64)
                keys = (used.reshape(len(rows), self.num_bands, self.band_rows) * weights).sum(axis=2)
                keys += np.arange(self.num_bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # bands apart
            prepared.signatures = signatures
            prepared.band_keys = keys.view(np.int64)
        return prepared


def prepare_lines(hasher: RowHasher, numbered: list[tuple[int, bytes]]) -> dict:
    """Parse, check and prepare a chunk of a samples file's (line number, line): what `collect` needs of it. A
    top-level function, so that worker processes can run it."""
    problems, valid = [], []
    counts = {"rows_read": 0, "invalid": 0}
    term_names: list[str] = []
    has_likelihood = False
    known = {"x", "y", "epoch", "log_reward", "valid", "log_reference", *SIGNALS}
    for number, raw in numbered:
        if not raw.strip():
            continue
        row, text = parse_line(raw)
        if row is None:
            problems.append((number, text))
            continue
        counts["rows_read"] += 1
        if not is_valid(row):
            counts["invalid"] += 1
            continue
        for name, value in row.items():
            is_term = name.startswith("log_") and isinstance(value, (int, float)) and name not in known
            if is_term and name not in term_names:
                term_names.append(name)
        has_likelihood = has_likelihood or row.get("log_likelihood") is not None
        valid.append((number, row, text))
    prepared = hasher.prepare([r for _, r, _ in valid], [t for _, _, t in valid], [n for n, _, _ in valid])
    return {"prepared": prepared, "problems": problems, "counts": counts, "term_names": term_names,
            "has_likelihood": has_likelihood}  # fmt: skip


class Collection:
    """The kept rows, one per group of duplicates, in SQLite: exact duplicates (same x and y), normalised
    duplicates (same words after `normalised_words`) and near duplicates (Jaccard similarity of word n-gram sets
    >= threshold, found by MinHash LSH over `MinHasher` signatures and confirmed on the MinHash estimate). The
    best-scored copy (by `dedup_by`) is kept; `copies` counts the group. The rows and their signatures are in
    SQLite, the two digests and the LSH bands in `KeyIndex` hash tables (12 bytes a digest, 8 a band), so a
    million rows need a few hundred MiB. `add_prepared` folds a batch that a `RowHasher` prepared, looking its keys
    up a batch at a time."""

    def __init__(self, db_path: str, dedup_by: str, near_threshold: float = 0.8, ngram: int = 3) -> None:
        self.db_path, self.db = db_path, sqlite3.connect(db_path)
        # a scratch file, removed when the command ends: no journal, no fsync, 64 MiB of page cache
        self.db.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -65536;")
        signal_columns = ", ".join(f"{name} REAL" for name in SIGNALS)
        self.db.execute(
            "CREATE TABLE rows (id INTEGER PRIMARY KEY, record TEXT NOT NULL, source INTEGER, line INTEGER, "
            f"dedup_score REAL, copies INTEGER, signature BLOB, {signal_columns})"
        )
        self.exact_index, self.normal_index, self.bands = KeyIndex(full_keys=True), KeyIndex(full_keys=True), KeyIndex()
        self.hasher = RowHasher(dedup_by, near_threshold, ngram)
        self.next_id = 1
        self.sources: list[dict] = [{}]  # the provenance the rows of each file share (index 0: none given)
        self.counts = {"kept": 0, "exact_duplicates": 0, "normalised_duplicates": 0, "near_duplicates": 0}

    def add(self, row: dict) -> str:
        """Store a valid row or fold it into its duplicate group; returns which: kept / exact / normalised / near."""
        return self.add_many([row])[0]

    def add_many(self, rows: list[dict]) -> list[str]:
        """`add` for a batch of rows, in order (a row may duplicate an earlier one of the same batch)."""
        return self.add_prepared(self.hasher.prepare(rows))

    @staticmethod
    def _known(index: KeyIndex, keys: list[int]) -> dict[int, int]:
        """key -> kept row id of the keys the index holds."""
        positions, ids = index.lookup(keys)
        return {keys[position]: row_id for position, row_id in zip(positions.tolist(), ids.tolist())}

    def add_prepared(self, batch: Prepared, where: dict | None = None) -> list[str]:
        """Fold a prepared batch in order; `where`: the provenance its rows share (stored once, merged into each
        row by `rows` and `ranked`). Returns each row's kind: kept / exact / normalised / near."""
        import numpy as np

        source = 0
        if where:
            if where is not self.sources[-1]:
                self.sources.append(where)
            source = len(self.sources) - 1
        exact, normal = (
            self._known(self.exact_index, batch.exact_keys),
            self._known(self.normal_index, batch.normal_keys),
        )
        near = batch.signatures is not None
        if near:
            kept_before, earlier, signatures = self._band_candidates(batch.band_keys)
        kept_ids: dict[int, int] = {}  # row of this batch -> its id, for the rows kept
        pending: dict[int, list] = {}  # id -> the columns of a row kept in this batch (inserted at its end)
        new_exact, new_normal, kinds = [], [], []
        for i, exact_key in enumerate(batch.exact_keys):
            normal_key = batch.normal_keys[i]
            kind, group = "exact", exact.get(exact_key)
            if group is None:
                kind, group = "normalised", normal.get(normal_key)
            if group is None and near and (i in kept_before or i in earlier):
                candidates = kept_before.get(i, set()) | {kept_ids[j] for j in earlier.get(i, ()) if j in kept_ids}
                kind, group = "near", self._nearest(batch.signatures[i], candidates, signatures)
            if group is not None:
                if kind != "exact":
                    exact[exact_key] = group
                    new_exact.append((exact_key, group))
                if kind == "near":
                    normal[normal_key] = group
                    new_normal.append((normal_key, group))
                kinds.append(self._fold(group, kind, batch, i, source, pending))
                continue
            row_id, self.next_id = self.next_id, self.next_id + 1
            signature = batch.signatures[i].tobytes() if near else None
            pending[row_id] = [batch.texts[i], source, batch.lines[i], batch.scores[i], 1, signature, *batch.signals[i]]
            exact[exact_key] = normal[normal_key] = kept_ids[i] = row_id
            new_exact.append((exact_key, row_id))
            new_normal.append((normal_key, row_id))
            if near:
                signatures[row_id] = batch.signatures[i]
            self.counts["kept"] += 1
            kinds.append("kept")
        self.db.executemany(
            f"INSERT INTO rows (id, record, source, line, dedup_score, copies, signature, {', '.join(SIGNALS)}) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, {', '.join('?' * len(SIGNALS))})",
            [(row_id, *columns) for row_id, columns in pending.items()],
        )
        for index, new in ((self.exact_index, new_exact), (self.normal_index, new_normal)):
            if new:
                index.insert([key for key, _ in new], [row_id for _, row_id in new])
        if near and kept_ids:
            rows, ids = list(kept_ids), list(kept_ids.values())
            self.bands.insert(batch.band_keys[rows].ravel(), np.repeat(ids, batch.band_keys.shape[1]))
        return kinds

    def _band_candidates(self, band_keys) -> tuple[dict[int, set[int]], dict[int, list[int]], dict[int, object]]:
        """For a batch's (rows, bands) band keys: row -> ids of kept rows sharing a band (from earlier batches),
        row -> the earlier rows of this batch sharing a band, and kept id -> signature for the former."""
        import numpy as np

        num_bands = band_keys.shape[1]
        flat = band_keys.ravel()
        at, ids = self.bands.lookup(flat)
        kept_before: dict[int, set[int]] = {}
        for position, row_id in zip((at // num_bands).tolist(), ids.tolist()):
            kept_before.setdefault(position, set()).add(row_id)
        order = np.argsort(flat, kind="stable")  # equal keys side by side, in row order
        same = flat[order][1:] == flat[order][:-1]
        earlier: dict[int, list[int]] = {}
        # each run of equal keys (rare: rows of a batch that share a band), from its first pair on
        for start in np.flatnonzero(same & ~np.concatenate([[False], same[:-1]])).tolist():
            end = start + 1
            while end < len(same) and same[end]:
                end += 1
            rows = [int(order[k]) // num_bands for k in range(start, end + 1)]  # a run of equal keys, in row order
            for k, later_row in enumerate(rows):
                earlier.setdefault(later_row, []).extend(row for row in rows[:k] if row != later_row)
        signatures = {}
        wanted = sorted({row_id for group in kept_before.values() for row_id in group})
        for first in range(0, len(wanted), 30000):  # SQLite's limit on bound parameters is 32,766
            part = wanted[first : first + 30000]
            query = f"SELECT id, signature FROM rows WHERE id IN ({', '.join('?' * len(part))})"
            signatures.update((i, np.frombuffer(blob, dtype=np.uint32)) for i, blob in self.db.execute(query, part))
        return kept_before, earlier, signatures

    def _nearest(self, signature, candidates: set[int], signatures: dict) -> int | None:
        """The kept row most similar to this signature (MinHash estimate >= threshold) among the candidates."""
        import numpy as np

        best = None
        for candidate in sorted(candidates):
            similarity = float(np.mean(signatures[candidate] == signature))
            if similarity >= self.hasher.near_threshold and (best is None or similarity > best[0]):
                best = (similarity, candidate)
        return None if best is None else best[1]

    def _fold(self, row_id: int, kind: str, batch: Prepared, i: int, source: int, pending: dict) -> str:
        """Count a copy in the group; the copy replaces the kept row (record and signals) when it scores better.
        A row kept in this same batch is still in `pending`: it is updated there."""
        self.counts[f"{kind}_duplicates"] += 1
        if row_id in pending:
            kept = pending[row_id]
            kept[4] += 1  # copies
            if batch.scores[i] > kept[3]:
                kept[:4] = [batch.texts[i], source, batch.lines[i], batch.scores[i]]
                kept[6:] = batch.signals[i]
            return kind
        self.db.execute("UPDATE rows SET copies = copies + 1 WHERE id = ?", (row_id,))
        self.db.execute(
            f"UPDATE rows SET record = ?, source = ?, line = ?, dedup_score = ?, "
            f"{', '.join(f'{n} = ?' for n in SIGNALS)} WHERE id = ? AND ? > dedup_score",
            (batch.texts[i], source, batch.lines[i], batch.scores[i], *batch.signals[i], row_id, batch.scores[i]),
        )
        return kind

    def rows(self, batch: int = 1000) -> Iterator[tuple[int, dict, int]]:
        """(id, row, copies) of every kept row, streamed in batches."""
        last = 0
        while True:
            part = self.db.execute(
                "SELECT id, record, source, line, copies FROM rows WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not part:
                return
            for row_id, record, source, line, copies in part:
                yield row_id, self._row(record, source, line), copies
            last = part[-1][0]

    def _row(self, record: str, source: int, line: int | None) -> dict:
        return stored_row(record, self.sources[source], line)

    def finish(self, log_references: dict[int, float]) -> None:
        """Set the reference ratio of the rows scored by the reference model (the other signals were computed as
        the rows came in), and drop the dedup indexes."""
        self.db.executemany(
            "UPDATE rows SET reference_ratio = log_likelihood - ? WHERE id = ? AND log_likelihood IS NOT NULL",
            [(log_reference, row_id) for row_id, log_reference in log_references.items()],
        )
        self.bands = self.exact_index = self.normal_index = None  # the indexes are done with
        self.db.commit()

    @staticmethod
    def _best_first(signal: str, top: int | None) -> tuple[str, tuple[int]]:
        """The ORDER BY and LIMIT of a ranking by `signal` (rows without it last, then by log R), and the limit."""
        return f"ORDER BY {signal} IS NULL, {signal} DESC, log_reward DESC, id LIMIT ?", (
            -1 if top is None else int(top),
        )

    def ranked(self, signal: str, top: int | None = None) -> Iterator[dict]:
        """Kept rows by `signal`, best first (rows without it last, by log R), each with its signals and copies."""
        order, limit = self._best_first(signal, top)
        query = f"SELECT record, source, line, copies, {', '.join(SIGNALS)} FROM rows {order}"
        for record, source, line, copies, *values in self.db.execute(query, limit):
            yield ranked_row(record, self.sources[source], line, copies, values)

    def ranked_ids(self, signal: str, top: int | None = None) -> list[int]:
        """The ids of `ranked`'s rows, in its order (the sort moves ids, not records)."""
        order, limit = self._best_first(signal, top)
        return [row_id for (row_id,) in self.db.execute(f"SELECT id FROM rows {order}", limit)]

    def signal_values(self, signal: str):
        """A signal's values over the kept rows that have it, as a float64 array (histograms of a million rows)."""
        import numpy as np

        cursor = self.db.execute(f"SELECT {signal} FROM rows WHERE {signal} IS NOT NULL")
        return np.fromiter((value for (value,) in cursor), np.float64)

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
    collection.add_many([row for row in rows if is_valid(row)])
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


def output_lines(db_path: str, first_rank: int, ids: list[int], sources: list[dict], feature_names: list[str]) -> bytes:
    """dataset.jsonl's lines for the kept rows `ids` (in rank order from first_rank), read from the collection's
    SQLite file: a top-level function, so that worker processes read and write them."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        marks = ", ".join("?" * len(ids))
        query = f"SELECT id, record, source, line, copies, {', '.join(SIGNALS)} FROM rows WHERE id IN ({marks})"
        stored = {row_id: rest for row_id, *rest in db.execute(query, ids)}
    finally:
        db.close()
    lines = []
    for rank, row_id in enumerate(ids, start=first_rank):
        record, source, line, copies, *values = stored[row_id]
        row = ranked_row(record, sources[source], line, copies, values)
        # orjson: 20x json's speed, the same shortest round-trip text for floats; NaN is written as null
        lines.append(orjson.dumps(output_row(rank, row, feature_names), option=orjson.OPT_APPEND_NEWLINE))
    return b"".join(lines)


def in_order(pool, function, jobs: Iterator[tuple]) -> Iterator:
    """function(*job) of each job, in order: in this process (pool None), or by the pool's workers with a few jobs
    in flight (never all of them: memory stays flat)."""
    if pool is None:
        yield from (function(*job) for job in jobs)
        return
    pending: collections.deque = collections.deque()
    for job in jobs:
        pending.append(pool.submit(function, *job))
        if len(pending) > 2 * pool._max_workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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


def histogram(values, name: str):
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


def write_dataset(
    collection: Collection, rank_by: str, top: int | None, term_names: list[str], out: str, pool=None
) -> int:
    """dataset.jsonl, dataset.parquet and hf_dataset/ (datasets.save_to_disk): the ranked rows, each written to a
    temporary name and moved into place, so a crash never leaves half a file. The pool's workers (if any) write
    the JSON lines. Returns the number of rows."""
    from datasets import Dataset

    columns = features(term_names)
    names = list(columns)
    scratch = tempfile.mkdtemp(dir=out, prefix=".scratch-")
    try:
        count = 0

        def write_jsonl(f) -> None:
            nonlocal count

            ids = collection.ranked_ids(rank_by, top)
            count = len(ids)
            jobs = (
                (collection.db_path, first + 1, ids[first : first + 2048], collection.sources, names)
                for first in range(0, len(ids), 2048)
            )
            for lines in in_order(pool, output_lines, jobs):
                f.write(lines)

        jsonl = os.path.join(out, "dataset.jsonl")
        atomic_write(jsonl, write_jsonl)

        # Arrow's JSON reader parses the file in blocks (C++), straight into a memory-mapped cache
        dataset = Dataset.from_json(jsonl, features=columns, cache_dir=os.path.join(scratch, "cache"))
        dataset.to_parquet(os.path.join(scratch, "dataset.parquet"))
        os.replace(os.path.join(scratch, "dataset.parquet"), os.path.join(out, "dataset.parquet"))
        dataset.save_to_disk(os.path.join(scratch, "hf_dataset"))
        shutil.rmtree(os.path.join(out, "hf_dataset"), ignore_errors=True)
        os.replace(os.path.join(scratch, "hf_dataset"), os.path.join(out, "hf_dataset"))
        return count
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ command


def numbered_chunks(path: str, progress, size: int = 2048) -> Iterator[list[tuple[int, bytes]]]:
    """A samples file's (line number, line) in chunks, read as they are asked for."""
    chunk = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            progress.update(len(raw))
            chunk.append((number, raw))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def collect(
    collection: Collection, files: list[tuple[str, str]], settings: dict, problems: Problems, quiet: bool, pool=None
):
    """Stream every samples file into the collection: the pool's processes parse, hash and score the lines (no
    pool: this process), this one folds them in file order. Returns (counts, the reward terms seen, whether any
    row has log p(y|x))."""
    from tqdm import tqdm

    counts = {"rows_read": 0, "invalid": 0}
    term_names: list[str] = []
    has_likelihood = False
    total = sum(os.path.getsize(path) for _, path in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=quiet) as bar:
        for run, path in files:
            where = provenance(run, path, settings[run])
            jobs = ((collection.hasher, chunk) for chunk in numbered_chunks(path, bar))
            for result in in_order(pool, prepare_lines, jobs):
                for number, reason in result["problems"]:
                    problems.report(path, number, reason)
                for name in result["counts"]:
                    counts[name] += result["counts"][name]
                term_names += [name for name in result["term_names"] if name not in term_names]
                has_likelihood = has_likelihood or result["has_likelihood"]
                collection.add_prepared(result["prepared"], where)
    return counts, term_names, has_likelihood


def write_report(collection: Collection, summary: dict, settings: dict, runs: list[str], rows: int, out: str) -> None:
    figures = [
        (f"histogram of {name}", figure_png(histogram(values, name)))
        for name in SIGNALS
        if len(values := collection.signal_values(name))
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
    pool = None
    try:
        workers = args.workers
        if workers is None:  # workers pay off once there are more than a few thousand rows
            small = sum(os.path.getsize(path) for _, path in files) < 4 << 20
            workers = 0 if small else min(4, os.cpu_count() or 1)
        if workers:
            pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=keep_freed_heap
            )
        counts, term_names, has_likelihood = collect(collection, files, settings, problems, args.quiet, pool)
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
        written = write_dataset(collection, rank_by, args.top, term_names, args.output, pool)
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
        if pool is not None:
            pool.shutdown(cancel_futures=True)
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
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that parse and hash the samples (0: none; default: up to 4 once the input is over 4 MiB)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-line warnings")
    return parser


def keep_freed_heap() -> None:
    """Stop glibc from handing the top of the heap back to the OS whenever more than 128 KiB of it is free: every
    zlib.compress (the zlib signals, twice a row) allocates and frees 256 KiB of state, and paging it back in made
    each call ~65 us instead of ~6 (measured on this project's 2-core VM). Up to 64 MiB stays with the process."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 1:
        parser.error("--top must be at least 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.ngram < 1 or args.near_duplicate <= 0:
        parser.error("--ngram must be >= 1 and --near-duplicate > 0")
    if args.no_reference and args.rank_by == "reference_ratio":
        parser.error("--rank-by reference_ratio needs the reference model: drop --no-reference")

    def body() -> None:
        keep_freed_heap()
        if args.quiet:
            import datasets

            datasets.disable_progress_bars()
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
