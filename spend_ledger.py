"""What the API oracle paid for, kept: token and dollar accounting from each reply's `usage` (prices per model,
overridable with --prices), and the SQLite response cache that is also the spend ledger. A repeated request
(temperature 0, a resumed run, a re-run) is answered from the cache and never paid twice; every paid reply is
written with its charge in one transaction, so a crash loses nothing that was paid for. The API key is never
stored here."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time

from errors import UserError

# ---------------------------------------------------------------------------------------------------- cost

# US dollars per 1M tokens: (input, cached input, output). Batch API requests cost half. Override or extend with
# --prices FILE.json: {"model-name": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}.
PRICES_PER_MILLION: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60},
    "gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00},
    "gpt-4.1": {"input": 2.00, "cached_input": 0.50, "output": 8.00},
    "gpt-4.1-mini": {"input": 0.40, "cached_input": 0.10, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "cached_input": 0.025, "output": 0.40},
    "gpt-3.5-turbo": {"input": 0.50, "cached_input": 0.50, "output": 1.50},
}


def load_prices(path: str | None) -> dict[str, dict[str, float]]:
    prices = {k: dict(v) for k, v in PRICES_PER_MILLION.items()}
    if path is None:
        return prices
    try:
        with open(path, encoding="utf-8") as f:
            custom = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read --prices {path}: {exc}") from None
    if not isinstance(custom, dict):
        raise UserError(f"--prices {path}: expected an object mapping model names to prices")
    for model, entry in custom.items():
        if (
            not isinstance(entry, dict)
            or not {"input", "output"} <= set(entry)
            or not all(isinstance(v, (int, float)) and v >= 0 for v in entry.values())
        ):
            raise UserError(
                f"--prices {path}: {model!r} needs non-negative numbers 'input' and 'output' "
                "(and optionally 'cached_input')"
            )
        prices[model] = {
            "input": float(entry["input"]),
            "output": float(entry["output"]),
            "cached_input": float(entry.get("cached_input", entry["input"])),
        }
    return prices


def price_for(model: str, prices: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """Exact name first, then the longest known prefix (dated snapshots such as gpt-4o-mini-2024-07-18)."""
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name + "-")]
    return prices[max(matches, key=len)] if matches else None


class CostTracker:
    """Thread-safe running totals of requests, tokens and dollars actually paid (cache hits are free)."""

    def __init__(self, model: str, prices: dict[str, dict[str, float]], discount: float = 1.0) -> None:
        self.price = price_for(model, prices)
        self.discount = discount
        self.lock = threading.Lock()
        self.totals = {
            "requests": 0,
            "cache_hits": 0,
            "failed": 0,
            "retries": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "completion_tokens": 0,
            "dollars": 0.0,
        }

    def charge(self, usage: dict, discount: float | None = None) -> dict:
        """One paid request's row of the spend ledger: its tokens and dollars (not yet added to the totals)."""
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        dollars = 0.0
        if self.price is not None:
            dollars = (
                (
                    (prompt - cached) * self.price["input"]
                    + cached * self.price["cached_input"]
                    + completion * self.price["output"]
                )
                / 1e6
                * (self.discount if discount is None else discount)
            )
        return {
            "requests": 1,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "completion_tokens": completion,
            "dollars": dollars,
        }

    def add(self, charge: dict) -> None:
        with self.lock:
            for name in LEDGER_COLUMNS:
                self.totals[name] += charge[name]

    def add_usage(self, usage: dict, discount: float | None = None) -> float:
        charge = self.charge(usage, discount)
        self.add(charge)
        return charge["dollars"]

    def count(self, key: str) -> None:
        with self.lock:
            self.totals[key] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.totals)

    def restore(self, totals: dict) -> None:
        with self.lock:
            self.totals.update({k: totals[k] for k in self.totals if k in totals})


# -------------------------------------------------------------------------------------------------- cache


LEDGER_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "dollars")


class ResponseCache:
    """SQLite (WAL) map from a request hash to the server's JSON reply, and the spend ledger: one row per paid
    request, tagged with the run that paid for it. A reply and its ledger row are written in one transaction,
    so after a crash (even kill -9) the ledger holds exactly the requests whose answers were kept, and a resumed
    run's spending restarts from the ledger, not from its last checkpoint. `store_responses=False` (--no-cache)
    keeps the ledger but neither stores nor serves replies."""

    def __init__(self, path: str, store_responses: bool = True) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.store_responses = store_responses
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                "response TEXT NOT NULL, created REAL NOT NULL)"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS spend (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, "
                "key TEXT NOT NULL, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
                "cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, dollars REAL NOT NULL, "
                "created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"response cache {path} is not a usable SQLite database ({exc}); move it away or use --no-cache"
            ) from None

    def put_paid(self, key: str, request: dict, response: dict, run_id: str, charge: dict) -> None:
        """Store a paid reply and its ledger row atomically."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.store_responses:
                    self.db.execute(
                        "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                        (key, json.dumps(request, ensure_ascii=False), json.dumps(response), time.time()),
                    )
                self.db.execute(
                    "INSERT INTO spend (run_id, key, requests, prompt_tokens, cached_tokens, completion_tokens, "
                    "dollars, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, key, *(charge[name] for name in LEDGER_COLUMNS), time.time()),
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def spent(self, run_id: str) -> dict:
        """The ledger's totals for one run."""
        with self.lock:
            row = self.db.execute(
                f"SELECT {', '.join(f'COALESCE(SUM({c}), 0)' for c in LEDGER_COLUMNS)} FROM spend WHERE run_id = ?",
                (run_id,),
            ).fetchone()
        return dict(zip(LEDGER_COLUMNS, row))

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        if not self.store_responses:
            return None
        with self.lock:
            row = self.db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
