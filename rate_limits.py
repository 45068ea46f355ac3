"""Per-minute limits on API requests and tokens: token buckets that also pause when the server's
`x-ratelimit-remaining-*` headers say the account is nearly out, and honour a 429's retry-after for every worker.
(The limit on requests in flight is concurrency.py's.)"""

from __future__ import annotations

import re
import threading
import time

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

    def __init__(
        self, rpm: float | None = None, tpm: float | None = None, clock=time.monotonic, sleep=time.sleep
    ) -> None:
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
        if (
            remaining_requests is not None
            and remaining_requests.isdigit()
            and int(remaining_requests) <= in_flight_hint
        ):
            pause = max(pause, parse_reset(header("x-ratelimit-reset-requests")) or 1.0)
        remaining_tokens = header("x-ratelimit-remaining-tokens")
        limit_tokens = header("x-ratelimit-limit-tokens")
        if (
            remaining_tokens
            and limit_tokens
            and remaining_tokens.isdigit()
            and limit_tokens.isdigit()
            and int(remaining_tokens) < 0.02 * int(limit_tokens)
        ):
            pause = max(pause, parse_reset(header("x-ratelimit-reset-tokens")) or 1.0)
        if pause > 0:
            with self.lock:
                self.paused_until = max(self.paused_until, self.clock() + pause)

    def pause_for(self, seconds: float) -> None:
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)
