"""The OpenAI (or any OpenAI-compatible server) response oracle, built to be left running overnight.

- One `openai.OpenAI` client shared by a pool of `max_workers` threads; its connection pool is sized to match,
  so at most `max_workers` requests are ever in flight.
- The SDK's own retries are off; `call_with_retries` retries 408/409/429/5xx, timeouts, dropped connections and
  malformed replies with full-jitter exponential backoff that honours `retry-after-ms` / `retry-after`, and stops
  the run on errors retrying cannot fix (400/401/403/404/422, 429 insufficient_quota).
- A token bucket for requests and tokens per minute, which also pauses when the server's
  `x-ratelimit-remaining-*` headers say the account is nearly out.
- A SQLite response cache keyed by the canonical request, so a repeated x at temperature 0, a resumed run or a
  re-run never pays twice; each logical request also carries one Idempotency-Key across its retries.
- Token and dollar accounting from each reply's `usage`.
The API key comes from the environment only: it is never written to the cache, logs, checkpoints or errors.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx2  # the HTTP library the openai client is built on (since openai 3)
import openai

from errors import OracleError, UserError
from reward_oracle import OracleResult, Task, sum_token_logprobs

DEFAULT_TIMEOUT_S = 60.0


def api_key_from_env(base_url: str | None) -> str:
    """OPENAI_API_KEY is required for api.openai.com. Self-hosted OpenAI-compatible servers (vLLM, ...) often
    need none, so with --base-url a missing key is replaced by a placeholder."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if base_url:
        return "EMPTY"
    raise UserError("OPENAI_API_KEY is not set: export it, or use --oracle hf for a local model")


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
        if not isinstance(entry, dict) or not {"input", "output"} <= set(entry) or \
                not all(isinstance(v, (int, float)) and v >= 0 for v in entry.values()):
            raise UserError(f"--prices {path}: {model!r} needs non-negative numbers 'input' and 'output' (and optionally 'cached_input')")
        prices[model] = {"input": float(entry["input"]), "output": float(entry["output"]),
                         "cached_input": float(entry.get("cached_input", entry["input"]))}
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
        self.totals = {"requests": 0, "cache_hits": 0, "failed": 0, "prompt_tokens": 0, "cached_tokens": 0,
                       "completion_tokens": 0, "dollars": 0.0}

    def add_usage(self, usage: dict, discount: float | None = None) -> float:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        dollars = 0.0
        if self.price is not None:
            dollars = ((prompt - cached) * self.price["input"] + cached * self.price["cached_input"]
                       + completion * self.price["output"]) / 1e6 * (self.discount if discount is None else discount)
        with self.lock:
            self.totals["requests"] += 1
            self.totals["prompt_tokens"] += prompt
            self.totals["cached_tokens"] += cached
            self.totals["completion_tokens"] += completion
            self.totals["dollars"] += dollars
        return dollars

    def count(self, key: str) -> None:
        with self.lock:
            self.totals[key] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.totals)

    def restore(self, totals: dict) -> None:
        with self.lock:
            self.totals.update({k: totals[k] for k in self.totals if k in totals})


# ------------------------------------------------------------------------------------------ rate limiting


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations: '1s', '6m0s', '20ms', '1h2m3.5s' -> seconds."""
    if not value:
        return None
    total, matched = 0.0, False
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", value):
        matched = True
        total += float(number) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if matched:
        return total
    try:
        return float(value)
    except ValueError:
        return None


class TokenBucket:
    """Continuous-refill token bucket: `per_minute` units a minute, bursts of at most `burst` units."""

    def __init__(self, per_minute: float, burst: float | None = None, clock=time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, burst if burst is not None else self.rate)  # one second's worth by default
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now). Caller holds the limiter's lock."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        amount = min(amount, self.capacity)  # a request larger than the burst still goes, once the bucket is full
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.capacity)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets plus a pause driven by the server's headers."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, clock=time.monotonic, sleep=time.sleep) -> None:
        self.requests = TokenBucket(rpm) if rpm else None
        self.tokens = TokenBucket(tpm, burst=tpm / 60.0 * 5) if tpm else None  # 5 s of tokens: requests are large
        self.paused_until = 0.0
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()

    def acquire(self, estimated_tokens: int) -> None:
        while True:
            with self.lock:
                wait = max(0.0, self.paused_until - self.clock())
                if self.requests is not None:
                    wait = max(wait, self.requests.wait_time(1))
                if self.tokens is not None:
                    wait = max(wait, self.tokens.wait_time(estimated_tokens))
                if wait <= 0:
                    if self.requests is not None:
                        self.requests.take(1)
                    if self.tokens is not None:
                        self.tokens.take(estimated_tokens)
                    return
            self.sleep(min(wait, 1.0))

    def settle_tokens(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the real usage is known."""
        if self.tokens is not None:
            with self.lock:
                self.tokens.level -= actual - estimated

    def observe_headers(self, headers, in_flight_hint: int = 1) -> None:
        """Pause new requests until the window resets when the server says almost none are left."""
        def header(name):
            return headers.get(name) if headers is not None else None

        pause = 0.0
        remaining_requests = header("x-ratelimit-remaining-requests")
        if remaining_requests is not None and remaining_requests.isdigit() and int(remaining_requests) <= in_flight_hint:
            pause = max(pause, parse_reset(header("x-ratelimit-reset-requests")) or 1.0)
        remaining_tokens = header("x-ratelimit-remaining-tokens")
        limit_tokens = header("x-ratelimit-limit-tokens")
        if remaining_tokens and limit_tokens and remaining_tokens.isdigit() and limit_tokens.isdigit() \
                and int(remaining_tokens) < 0.02 * int(limit_tokens):
            pause = max(pause, parse_reset(header("x-ratelimit-reset-tokens")) or 1.0)
        if pause > 0:
            with self.lock:
                self.paused_until = max(self.paused_until, self.clock() + pause)

    def pause_for(self, seconds: float) -> None:
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)


# -------------------------------------------------------------------------------------------------- cache


class ResponseCache:
    """SQLite (WAL) map from a request hash to the server's JSON reply. Each insert is its own transaction,
    so a crash mid-write leaves the database as it was before that insert."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                            "response TEXT NOT NULL, created REAL NOT NULL)")
        except sqlite3.DatabaseError as exc:
            raise UserError(f"response cache {path} is not a usable SQLite database ({exc}); move it away or use --no-cache") from None

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, request: dict, response: dict) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                            (key, json.dumps(request, ensure_ascii=False), json.dumps(response), time.time()))

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()


# ------------------------------------------------------------------------------------------------ retries

RETRYABLE_STATUS = {408, 409, 429}


class FatalAPIError(OracleError):
    """An error that retrying cannot fix: the run stops with this one-line reason."""


@dataclass
class RetryPolicy:
    max_attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (AWS architecture blog): uniform(0, min(cap, base * 2^attempt)); a server-given
        retry-after wins when present, since the server knows when capacity returns."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        return self.rng.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** attempt))


def retry_after_seconds(headers) -> float | None:
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None  # an HTTP date: rare for this API; fall back to backoff
    return None


def classify(exc: Exception, model: str) -> tuple[str, float | None]:
    """('fatal' | 'retry', retry_after_seconds) for an exception raised by one attempt."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error", body) if isinstance(body, dict) else {}
        code = (error or {}).get("code") or (error or {}).get("type")
        if status == 429 and code == "insufficient_quota":
            return "fatal", None
        if status in RETRYABLE_STATUS or status >= 500:
            return "retry", retry_after_seconds(exc.response.headers)
        return "fatal", None
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, httpx2.TransportError)):
        return "retry", None
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError, ValueError)):
        return "retry", None  # malformed reply: the next attempt usually succeeds
    return "fatal", None


def fatal_message(exc: Exception, model: str) -> str:
    """A one-line reason. Uses the server's message, which never contains our key (OpenAI redacts keys)."""
    if not isinstance(exc, openai.APIStatusError):
        return f"oracle request failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    message = (exc.message or "").splitlines()[0] if exc.message else f"HTTP {exc.status_code}"
    if isinstance(exc, openai.AuthenticationError):
        return f"authentication failed (HTTP 401): check OPENAI_API_KEY. Server said: {message}"
    if isinstance(exc, openai.PermissionDeniedError) and "logprob" in message.lower():
        return (f"model {model!r} does not allow logprobs (HTTP 403); use a model that returns them "
                f"(e.g. gpt-4o-mini, gpt-4o, gpt-4.1-mini) or --oracle hf. Server said: {message}")
    if isinstance(exc, openai.NotFoundError):
        return f"model {model!r} or endpoint not found (HTTP 404). Server said: {message}"
    if exc.status_code == 429:
        return f"out of quota (HTTP 429 insufficient_quota): add credit or raise the limit. Server said: {message}"
    return f"oracle request rejected (HTTP {exc.status_code}). Server said: {message}"


def call_with_retries(attempt_fn, policy: RetryPolicy, model: str, limiter: RateLimiter | None = None,
                      sleep=time.sleep, on_retry=None):
    """Run attempt_fn until it succeeds. Returns (value, None) or (None, reason) after the last attempt;
    raises FatalAPIError for errors retrying cannot fix."""
    last_reason = "no attempt made"
    for attempt in range(policy.max_attempts):
        try:
            return attempt_fn(), None
        except OracleError:
            raise
        except Exception as exc:  # classified below; anything unknown is fatal, never swallowed
            kind, retry_after = classify(exc, model)
            if kind == "fatal":
                raise FatalAPIError(fatal_message(exc, model)) from None
            last_reason = (f"HTTP {exc.status_code}" if isinstance(exc, openai.APIStatusError) else type(exc).__name__)
            if attempt + 1 == policy.max_attempts:
                break
            delay = policy.delay(attempt, retry_after)
            if retry_after is not None and limiter is not None:
                limiter.pause_for(retry_after)  # a 429's retry-after applies to every worker, not just this one
            if on_retry is not None:
                on_retry(last_reason)
            sleep(delay)
    return None, f"failed after {policy.max_attempts} attempts: {last_reason}"


# --------------------------------------------------------------------------------------- request building


def chat_request(model: str, task: Task, x: str, temperature: float, max_tokens: int) -> dict:
    """The canonical chat request: the exact JSON body sent, and the cache key's input."""
    return {"model": model, "messages": task.messages(x), "temperature": temperature, "max_tokens": max_tokens,
            "logprobs": True, "n": 1}


def echo_request(model: str, prompt: str, target: str) -> dict:
    # max_tokens=1: several servers reject 0; the one generated token lies past the target and is ignored.
    return {"model": model, "prompt": prompt + target, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0}


def parse_chat_completion(body: dict, model: str) -> OracleResult:
    """log p(y|x) from a chat completion's JSON body (live, cached or from a Batch API output line)."""
    choice = (body.get("choices") or [None])[0]
    if not isinstance(choice, dict):
        raise ValueError("reply has no choices")
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise OracleError(f"the server returned no logprobs for model {model!r}; it must support logprobs=True")
    logprobs = [float(t["logprob"]) for t in content]
    total, saw_sentinel = sum_token_logprobs(logprobs)
    return OracleResult(
        response=(choice.get("message") or {}).get("content") or "", log_likelihood=total, num_tokens=len(logprobs),
        truncated=choice.get("finish_reason") == "length", valid=not saw_sentinel,
        error="logprob_sentinel" if saw_sentinel else None, usage=body.get("usage") or {},
    )


def parse_echo_completion(body: dict, prompt_len: int, full_len: int, target: str, no_echo_message: str) -> OracleResult:
    logprobs = ((body.get("choices") or [{}])[0] or {}).get("logprobs") or {}
    offsets, token_logprobs = logprobs.get("text_offset") or [], logprobs.get("token_logprobs") or []
    if len(offsets) < 2:
        raise OracleError(no_echo_message)
    # Tokens that start inside the target. A token straddling the prompt/target boundary is counted with the
    # prompt; with a prompt ending in whitespace or a newline this does not happen in practice.
    picked = [lp for off, lp in zip(offsets, token_logprobs) if prompt_len <= off < full_len and lp is not None]
    if not picked:
        raise OracleError("the server's echoed tokens do not cover --target-response")
    total, saw_sentinel = sum_token_logprobs(picked)
    return OracleResult(response=target, log_likelihood=total, num_tokens=len(picked), valid=not saw_sentinel,
                        error="logprob_sentinel" if saw_sentinel else None, usage=body.get("usage") or {})


# ------------------------------------------------------------------------------------------------- oracle


class OpenAIChatOracle:
    """log p(y|x) from chat completions with logprobs=True, or, with `target_response`, log p(y*|x) from a
    completions endpoint that echoes prompt logprobs (vLLM does; api.openai.com does not)."""

    def __init__(self, model: str, task: Task, temperature: float = 1.0, max_tokens: int | None = None,
                 max_workers: int = 8, base_url: str | None = None, target_response: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 rpm: float | None = None, tpm: float | None = None, cache_path: str | None = None,
                 prices: dict | None = None) -> None:
        if max_workers < 1:
            raise UserError(f"--max-api-workers must be >= 1, got {max_workers}")
        self.model, self.task, self.temperature = model, task, temperature
        self.max_tokens = max_tokens or task.max_response_tokens
        self.target_response = target_response
        self.max_workers = max_workers
        self.base_url = base_url or "https://api.openai.com/v1"
        limits = httpx2.Limits(max_connections=max_workers, max_keepalive_connections=max_workers)
        self.client = openai.OpenAI(
            api_key=api_key_from_env(base_url), base_url=base_url, timeout=timeout_s, max_retries=0,
            http_client=openai.DefaultHttpxClient(limits=limits, timeout=timeout_s),
        )
        self.retry = retry or RetryPolicy()
        self.limiter = RateLimiter(rpm, tpm)
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.cost = CostTracker(model, prices if prices is not None else PRICES_PER_MILLION)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oracle")
        self.retries = 0

    def score(self, texts: list[str]) -> list[OracleResult]:
        # Identical requests in one batch are sent once: the second would pay for the same answer.
        futures: dict[str, object] = {}
        keys = []
        for x in texts:
            key = self.cache_key(*self.request_for(x))
            keys.append(key)
            if key not in futures:
                futures[key] = self.pool.submit(self._score_one, x)
        results = {key: future.result() for key, future in futures.items()}
        return [copy.copy(results[key]) for key in keys]  # in order, so results line up with texts

    def request_for(self, x: str) -> tuple[str, dict]:
        """(endpoint, JSON body) of the request that scores x."""
        if self.target_response is not None:
            return "/v1/completions", echo_request(self.model, self.task.plain_prompt(x), self.target_response)
        return "/v1/chat/completions", chat_request(self.model, self.task, x, self.temperature, self.max_tokens)

    def cache_key(self, endpoint: str, body: dict) -> str:
        return ResponseCache.key({"base_url": self.base_url, "endpoint": endpoint, **body})

    def parse(self, x: str, body: dict) -> OracleResult:
        if self.target_response is not None:
            prompt = self.task.plain_prompt(x)
            return parse_echo_completion(body, len(prompt), len(prompt) + len(self.target_response),
                                         self.target_response, self.no_echo_message())
        return parse_chat_completion(body, self.model)

    def _score_one(self, x: str) -> OracleResult:
        endpoint, body = self.request_for(x)
        key = self.cache_key(endpoint, body)
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            self.cost.count("cache_hits")
            result = self.parse(x, cached)
            result.usage = {**result.usage, "cached_response": True}
            return result
        estimated_tokens = len(json.dumps(body["messages"] if "messages" in body else body["prompt"])) // 4 + self.max_tokens

        def attempt() -> dict:
            self.limiter.acquire(estimated_tokens)
            create = (self.client.completions if endpoint == "/v1/completions" else self.client.chat.completions)
            # One Idempotency-Key per logical request, reused by every retry of it.
            raw = create.with_raw_response.create(**body, extra_headers={"Idempotency-Key": key[:48]})
            self.limiter.observe_headers(raw.headers, in_flight_hint=self.max_workers)
            reply = json.loads(raw.text)  # malformed JSON raises here and is retried
            self.parse(x, reply)  # a reply we cannot parse is retried too
            return reply

        try:
            reply, failure = call_with_retries(attempt, self.retry, self.model, self.limiter, on_retry=self._count_retry)
        except FatalAPIError as exc:
            if self.target_response is not None and "HTTP 400" in str(exc):
                raise OracleError(f"{self.no_echo_message()}. {exc}") from None
            raise
        if failure is not None:
            self.cost.count("failed")
            return OracleResult.failed(failure)
        self.cost.add_usage(reply.get("usage") or {})
        self.limiter.settle_tokens(estimated_tokens, int((reply.get("usage") or {}).get("total_tokens") or estimated_tokens))
        if self.cache is not None:
            self.cache.put(key, body, reply)
        return self.parse(x, reply)

    def _count_retry(self, reason: str) -> None:
        with self.cost.lock:
            self.retries += 1

    def no_echo_message(self) -> str:
        return (f"{self.base_url} cannot score --target-response: it needs a completions endpoint that "
                "returns prompt logprobs with echo=True (vLLM does, api.openai.com does not); use --oracle hf")

    def stats(self) -> dict:
        return {**self.cost.snapshot(), "retries": self.retries}

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
        if self.cache is not None:
            self.cache.close()
