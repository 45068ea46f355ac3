"""OpenAI Batch API rounds: half the price, hours of latency.

A round uploads one JSONL file of requests (`/v1/files`), creates a batch (`/v1/batches`), polls it until it
ends, and matches the output and error files back to inputs by `custom_id`. Requests already in the response
cache are not submitted. The batch id goes into a checkpoint before the first poll, so a restarted run picks
the same batch up instead of paying for it again.
"""

from __future__ import annotations

import json
import time

from api_client import OpenAIChatOracle, call_with_retries
from errors import OracleError
from reward_oracle import OracleResult

BATCH_DISCOUNT = 0.5  # Batch API requests cost half of the synchronous price
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def custom_id(cache_key: str) -> str:
    """Derived from the request itself, so identical requests share one line and results match by content."""
    return f"req-{cache_key[:40]}"


def _api(oracle: OpenAIChatOracle, fn, *args, **kwargs):
    """One Batch API call with the oracle's retry policy; a call that never succeeds stops the run."""
    value, failure = call_with_retries(lambda: fn(*args, **kwargs), oracle.retry, oracle.model, oracle.limiter)
    if failure is not None:
        raise OracleError(f"Batch API call {getattr(fn, '__name__', 'request')} {failure}")
    return value


def submit_batch(oracle: OpenAIChatOracle, texts: list[str]) -> str | None:
    """Upload and create a batch for every text whose request is not cached. Returns the batch id, or None
    when everything was cached."""
    lines, endpoint, seen = [], None, set()
    for x in texts:
        endpoint, body = oracle.request_for(x)
        key = oracle.cache_key(endpoint, body)
        if key in seen or (oracle.cache is not None and oracle.cache.get(key) is not None):
            continue  # identical requests are sent once; cached ones not at all
        seen.add(key)
        lines.append(json.dumps({"custom_id": custom_id(key), "method": "POST", "url": endpoint, "body": body}))
    if not lines:
        return None
    data = ("\n".join(lines) + "\n").encode()
    uploaded = _api(
        oracle, oracle.client.files.create, file=("gfn_batch.jsonl", data, "application/jsonl"), purpose="batch"
    )
    batch = _api(
        oracle,
        oracle.client.batches.create,
        input_file_id=uploaded.id,
        endpoint=endpoint,
        completion_window="24h",
        metadata={"created_by": "dataset-sucker"},
    )
    return batch.id


def wait_for_batch(oracle: OpenAIChatOracle, batch_id: str, poll_seconds: float, sleep=time.sleep, on_poll=None):
    while True:
        batch = _api(oracle, oracle.client.batches.retrieve, batch_id)
        if on_poll is not None:
            on_poll(batch)
        if batch.status in TERMINAL:
            return batch
        sleep(poll_seconds)


def _file_lines(oracle: OpenAIChatOracle, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    content = _api(oracle, oracle.client.files.content, file_id)
    lines = []
    for line in content.text.splitlines():
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line is treated like a missing result: that input is reported failed
    return lines


def collect_results(oracle: OpenAIChatOracle, batch, texts: list[str]) -> list[OracleResult]:
    """Results in the order of texts: cached, answered by the batch, or failed with the reason."""
    by_id = {}
    if batch is not None:
        for line in _file_lines(oracle, batch.output_file_id) + _file_lines(oracle, batch.error_file_id):
            by_id[line.get("custom_id")] = line
    results, billed = [], set()
    for x in texts:
        endpoint, body = oracle.request_for(x)
        key = oracle.cache_key(endpoint, body)
        cached = oracle.cache.get(key) if oracle.cache is not None else None
        if cached is not None:
            oracle.cost.count("cache_hits")
            results.append(oracle.parse(x, cached))
            continue
        line = by_id.get(custom_id(key))
        response = (line or {}).get("response") or {}
        if line is None:
            status = batch.status if batch is not None else "missing"
            oracle.cost.count("failed")
            results.append(OracleResult.failed(f"batch {status}: no result for this request"))
        elif response.get("status_code") != 200:
            error = (response.get("body") or {}).get("error") or line.get("error") or {}
            oracle.cost.count("failed")
            results.append(
                OracleResult.failed(f"batch: HTTP {response.get('status_code')}: {error.get('message', 'error')}")
            )
        else:
            reply = response["body"]
            if custom_id(key) not in billed:  # a duplicate x in the pool was one request, paid once
                billed.add(custom_id(key))
                oracle.record_paid(key, body, reply, discount=BATCH_DISCOUNT)
            results.append(oracle.parse(x, reply))
    return results
