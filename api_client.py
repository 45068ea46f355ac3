"""The OpenAI (or any OpenAI-compatible server) response oracle, built to be left running overnight.

- One `openai.OpenAI` client shared by a pool of `max_workers` threads; its connection pool is sized to match,
  so at most `max_workers` requests are ever in flight.
- The SDK's own retries are off; `call_with_retries` retries 408/409/429/5xx, timeouts, dropped connections and
  malformed replies with full-jitter exponential backoff that honours `retry-after-ms` / `retry-after`, and stops
  the run on errors retrying cannot fix (400/401/403/404/422, 429 insufficient_quota).
- Per-minute limits on requests and tokens (rate_limits.py) and an adaptive limit on requests in flight
  (concurrency.py).
- The response cache and spend ledger (spend_ledger.py), keyed by the canonical request, so a repeated x at
  temperature 0, a resumed run or a re-run never pays twice; each logical request also carries one
  Idempotency-Key across its retries.
The API key comes from the environment only: it is never written to the cache, logs, checkpoints or errors.
"""

from __future__ import annotations

import copy
import json
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx2  # the HTTP library the openai client is built on (since openai 3)
import openai

from concurrency import AdaptiveConcurrency
from errors import OracleError, UserError
from rate_limits import RateLimiter
from reward_oracle import OracleResult, Task, sum_token_logprobs
from spend_ledger import PRICES_PER_MILLION, CostTracker, ResponseCache

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
        return self.rng.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


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


def classify(exc: Exception) -> tuple[str, float | None]:
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


OVERLOAD_STATUS = {429, 503}  # the server says it has too much to do


def concurrency_outcome(exc: BaseException) -> str:
    """How a failed attempt steers the adaptive concurrency limit: a timeout, 429 or 503 means the server is
    overloaded (halve the limit); anything else says nothing about load."""
    if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException)):
        return "overload"
    if isinstance(exc, openai.APIStatusError) and exc.status_code in OVERLOAD_STATUS:
        return "overload"
    return "error"


def completion_work(text: str) -> float:
    """Completion tokens + 1 of a raw reply: latency is compared per unit of work, since long replies take longer."""
    try:
        usage = json.loads(text).get("usage") or {}
        return float(int(usage.get("completion_tokens") or 0) + 1)
    except (ValueError, TypeError, AttributeError):
        return 1.0  # malformed: the attempt is retried anyway; its latency still counts as one unit


def fatal_message(exc: Exception, model: str) -> str:
    """A one-line reason. Uses the server's message, which never contains our key (OpenAI redacts keys)."""
    if not isinstance(exc, openai.APIStatusError):
        return f"oracle request failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    message = (exc.message or "").splitlines()[0] if exc.message else f"HTTP {exc.status_code}"
    if isinstance(exc, openai.AuthenticationError):
        return f"authentication failed (HTTP 401): check OPENAI_API_KEY. Server said: {message}"
    if isinstance(exc, openai.PermissionDeniedError) and "logprob" in message.lower():
        return (
            f"model {model!r} does not allow logprobs (HTTP 403); use a model that returns them "
            f"(e.g. gpt-4o-mini, gpt-4o, gpt-4.1-mini) or --oracle hf. Server said: {message}"
        )
    if isinstance(exc, openai.NotFoundError):
        return f"model {model!r} or endpoint not found (HTTP 404). Server said: {message}"
    if exc.status_code == 429:
        return f"out of quota (HTTP 429 insufficient_quota): add credit or raise the limit. Server said: {message}"
    return f"oracle request rejected (HTTP {exc.status_code}). Server said: {message}"


# Failures that mean the server cannot be reached (refused, dropped, timed out), as opposed to a bad answer:
# batches in which every request failed this way stop the run (see train.py --max-unreachable-batches).
UNREACHABLE = (openai.APITimeoutError, openai.APIConnectionError, httpx2.TransportError)
UNREACHABLE_PREFIX = "unreachable: "


def connection_refused(exc: BaseException) -> bool:
    """The connection could not be opened at all (nothing listens on the port, or the host is unknown): the
    openai client's APIConnectionError raised from the HTTP library's ConnectError. A slow server times out and
    an overloaded one answers 429/503; neither is this."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, httpx2.ConnectError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class RefusalClock:
    """How long the server has been refusing connections, shared by every request of an oracle. A server that
    refuses is down; retrying each request's full backoff against it kept a run going for minutes per batch. Once
    refusals have lasted `grace_s` with no answer in between, each request gives up at its next refusal, so a dead
    server fails whole batches within seconds and train.py's --max-unreachable-batches stops the run; a server
    that restarts within the grace, or is merely slow (timeouts), is retried as before. Any answer resets it."""

    def __init__(self, grace_s: float = 10.0, clock=time.monotonic) -> None:
        self.grace_s, self.clock = grace_s, clock
        self.since: float | None = None
        self.lock = threading.Lock()

    def refused(self) -> bool:
        """Record a refusal; True once refusals have lasted the grace (give up now)."""
        with self.lock:
            now = self.clock()
            if self.since is None:
                self.since = now
            return now - self.since >= self.grace_s

    def answered(self) -> None:
        with self.lock:
            self.since = None

    def remaining(self) -> float:
        """Seconds of grace left (a retry need not sleep past the moment it would give up)."""
        with self.lock:
            return self.grace_s if self.since is None else max(0.0, self.since + self.grace_s - self.clock())


def call_with_retries(
    attempt_fn,
    policy: RetryPolicy,
    model: str,
    limiter: RateLimiter | None = None,
    sleep=time.sleep,
    on_retry=None,
    refusals: RefusalClock | None = None,
):
    """Run attempt_fn until it succeeds. Returns (value, None) or (None, reason) after the last attempt (or at a
    refusal once `refusals` says the server has been refusing for its grace); raises FatalAPIError for errors
    retrying cannot fix."""
    last_reason = "no attempt made"
    unreachable = False
    for attempt in range(policy.max_attempts):
        try:
            value = attempt_fn()
            if refusals is not None:
                refusals.answered()
            return value, None
        except OracleError:
            raise
        except Exception as exc:  # classified below; anything unknown is fatal, never swallowed
            kind, retry_after = classify(exc)
            if kind == "fatal":
                raise FatalAPIError(fatal_message(exc, model)) from None
            last_reason = f"HTTP {exc.status_code}" if isinstance(exc, openai.APIStatusError) else type(exc).__name__
            unreachable = isinstance(exc, UNREACHABLE)
            if refusals is not None and connection_refused(exc) and refusals.refused():
                last_reason = f"connection refused for {refusals.grace_s:g} s or more"
                break
            if attempt + 1 == policy.max_attempts:
                break
            delay = policy.delay(attempt, retry_after)
            if refusals is not None and connection_refused(exc):
                delay = min(delay, refusals.remaining())
            if retry_after is not None and limiter is not None:
                limiter.pause_for(retry_after)  # a 429's retry-after applies to every worker, not just this one
            if on_retry is not None:
                on_retry(last_reason)
            sleep(delay)
    prefix = UNREACHABLE_PREFIX if unreachable else ""
    return None, f"{prefix}failed after {attempt + 1} attempts: {last_reason}"


# --------------------------------------------------------------------------------------- request building


def chat_request(model: str, task: Task, x: str, temperature: float, max_tokens: int) -> dict:
    """The canonical chat request: the exact JSON body sent, and the cache key's input. top_logprobs is sent
    explicitly: llama.cpp's server returns no logprobs at all without it (0 is accepted by OpenAI, vLLM and
    llama.cpp alike)."""
    return {
        "model": model,
        "messages": task.messages(x),
        "temperature": temperature,
        "max_tokens": max_tokens,
        "logprobs": True,
        "top_logprobs": 0,
        "n": 1,
    }


def plain_request(model: str, prompt: str, temperature: float, max_tokens: int) -> dict:
    """A completions request for --oracle-format plain: the prompt text as is, y's token logprobs back."""
    return {
        "model": model,
        "prompt": prompt,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "n": 1,
    }


def proposal_request(model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """A completions request that has the served model write an x (oracle proposals): sampled at temperature 1,
    with its own seed (vLLM, llama.cpp and OpenAI take one), no logprobs needed."""
    return {"model": model, "prompt": prompt, "temperature": 1.0, "max_tokens": max_tokens, "seed": seed, "n": 1}


def echo_request(model: str, prompt: str, target: str) -> dict:
    # max_tokens=1: several servers reject 0; the one generated token lies past the target and is ignored.
    return {"model": model, "prompt": prompt + target, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0}


def first_choice(body: dict) -> dict:
    choice = (body.get("choices") or [None])[0]
    if not isinstance(choice, dict):
        raise ValueError("reply has no choices")  # malformed: retried
    return choice


def generated_result(body: dict, choice: dict, response: str, logprobs: list[float]) -> OracleResult:
    """log p(y|x) as the sum of y's token logprobs; a -9999 sentinel makes it invalid; cut at the length limit
    is recorded as truncated."""
    total, saw_sentinel = sum_token_logprobs(logprobs)
    return OracleResult(
        response=response,
        log_likelihood=total,
        num_tokens=len(logprobs),
        truncated=choice.get("finish_reason") == "length",
        valid=not saw_sentinel,
        error="logprob_sentinel" if saw_sentinel else None,
        usage=body.get("usage") or {},
    )


def parse_chat_completion(body: dict, model: str) -> OracleResult:
    """log p(y|x) from a chat completion's JSON body (live, cached or from a Batch API output line)."""
    choice = first_choice(body)
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise OracleError(f"the server returned no logprobs for model {model!r}; it must support logprobs=True")
    response = (choice.get("message") or {}).get("content") or ""
    return generated_result(body, choice, response, [float(t["logprob"]) for t in content])


def parse_plain_completion(body: dict, model: str) -> OracleResult:
    """log p(y|x) from a completions reply (no echo): the generated tokens' logprobs."""
    choice = first_choice(body)
    token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if token_logprobs is None:
        raise OracleError(f"the server returned no logprobs for model {model!r} on its completions endpoint")
    return generated_result(body, choice, choice.get("text") or "", [float(lp) for lp in token_logprobs])


def parse_echo_completion(
    body: dict, prompt_len: int, full_len: int, target: str, no_echo_message: str
) -> OracleResult:
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
    return OracleResult(
        response=target,
        log_likelihood=total,
        num_tokens=len(picked),
        valid=not saw_sentinel,
        error="logprob_sentinel" if saw_sentinel else None,
        usage=body.get("usage") or {},
    )


# ------------------------------------------------------------------------------------------------- oracle


class OpenAIChatOracle:
    """log p(y|x) from chat completions with logprobs=True, or, with `target_response`, log p(y*|x) from a
    completions endpoint that echoes prompt logprobs (vLLM does; api.openai.com does not)."""

    has_spending = True  # it pays for answers: stats(), cost, run_id and the spend ledger (reward_oracle.Oracle)
    deterministic = False  # answers are sampled (or cached); never asked for prefix rewards

    def __init__(
        self,
        model: str,
        task: Task,
        temperature: float = 1.0,
        max_tokens: int | None = None,
        max_workers: int = 8,
        base_url: str | None = None,
        target_response: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        cache_path: str | None = None,
        prices: dict | None = None,
        store_responses: bool = True,
        prompt_format: str = "auto",
        adaptive_concurrency: bool = True,
    ) -> None:
        if max_workers < 1:
            raise UserError(f"--max-api-workers must be >= 1, got {max_workers}")
        if prompt_format not in ("auto", "chat", "plain"):
            raise UserError(f"unknown oracle format {prompt_format!r}")
        # chat (and auto): chat completions of the task's messages; plain: the completions endpoint, fed the task's
        # plain prompt as text, for base models served by vLLM or llama.cpp.
        self.prompt_format = "plain" if prompt_format == "plain" else "chat"
        self.model, self.task, self.temperature = model, task, temperature
        self.max_tokens = max_tokens or task.max_response_tokens
        self.target_response = target_response
        self.max_workers = max_workers
        self.base_url = base_url or "https://api.openai.com/v1"
        limits = httpx2.Limits(max_connections=max_workers, max_keepalive_connections=max_workers)
        self.client = openai.OpenAI(
            api_key=api_key_from_env(base_url),
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(limits=limits, timeout=timeout_s),
        )
        self.retry = retry or RetryPolicy()
        self.refusals = RefusalClock()  # a server that stops accepting connections fails fast after 10 s
        self.limiter = RateLimiter(rpm, tpm)
        self.cache = ResponseCache(cache_path, store_responses=store_responses) if cache_path else None
        self.run_id = uuid.uuid4().hex  # tags this run's rows in the spend ledger; a resumed run takes its own back
        self.cost = CostTracker(model, prices if prices is not None else PRICES_PER_MILLION)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oracle")
        # max_workers is the ceiling; adaptive, fewer are in flight while the server queues (one-slot llama.cpp)
        self.concurrency = AdaptiveConcurrency(max_workers, fixed=not adaptive_concurrency)

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
        if self.prompt_format == "plain":
            return "/v1/completions", plain_request(
                self.model, self.task.plain_prompt(x), self.temperature, self.max_tokens
            )
        return "/v1/chat/completions", chat_request(self.model, self.task, x, self.temperature, self.max_tokens)

    def cache_key(self, endpoint: str, body: dict) -> str:
        return ResponseCache.key({"base_url": self.base_url, "endpoint": endpoint, **body})

    def parse(self, x: str, body: dict) -> OracleResult:
        if self.target_response is None and self.prompt_format == "plain":
            return parse_plain_completion(body, self.model)
        if self.target_response is not None:
            prompt = self.task.plain_prompt(x)
            return parse_echo_completion(
                body, len(prompt), len(prompt) + len(self.target_response), self.target_response, self.no_echo_message()
            )
        return parse_chat_completion(body, self.model)

    def _score_one(self, x: str) -> OracleResult:
        endpoint, body = self.request_for(x)
        try:
            reply, failure, cached = self._paid_reply(endpoint, body, lambda reply: self.parse(x, reply))
        except FatalAPIError as exc:
            if self.target_response is not None and "HTTP 400" in str(exc):
                raise OracleError(f"{self.no_echo_message()}. {exc}") from None
            raise
        if failure is not None:
            return OracleResult.failed(failure, unreachable=failure.startswith(UNREACHABLE_PREFIX))
        result = self.parse(x, reply)
        if cached:
            result.usage = {**result.usage, "cached_response": True}
        return result

    def propose(self, num: int, max_new_tokens: int, first_seed: int = 0, start_text: str = "") -> list[str]:
        """x written by the served model itself (--oracle-format plain: a completions endpoint, as vLLM and
        llama.cpp serve): `num` completions at temperature 1 of the plain prompt's part before x, or `start_text`
        (the document start) when that part is empty — llama.cpp's server fails on an empty prompt (HTTP 500) —
        request i with seed first_seed + i, so that they differ, are cached apart, and a resumed run gets the same
        ones back from the cache. Paid like any answer (ledger, cost, retries); a failed request writes ""."""
        if self.prompt_format != "plain":
            raise UserError("--oracle-proposal-fraction with --oracle openai needs --oracle-format plain (completions)")
        marker = "\ue000x\ue000"
        prompt = self.task.plain_prompt(marker).partition(marker)[0] or start_text
        bodies = [proposal_request(self.model, prompt, max_new_tokens, first_seed + i) for i in range(num)]
        futures = [self.pool.submit(self._paid_reply, "/v1/completions", body, first_choice) for body in bodies]
        written = []
        for future in futures:
            reply, failure, _ = future.result()
            written.append("" if failure is not None else str(first_choice(reply).get("text") or ""))
        return written

    def _paid_reply(self, endpoint: str, body: dict, check) -> tuple[dict | None, str | None, bool]:
        """(reply, failure, cached) for one request: from the response cache, or sent under the rate limits and
        the adaptive concurrency limit with retries (`check(reply)` raises on a reply we cannot use: retried),
        then recorded as paid. A failure after the retries is (None, reason, False); a fatal one raises."""
        key = self.cache_key(endpoint, body)
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            self.cost.count("cache_hits")
            return cached, None, True
        estimated_tokens = (
            len(json.dumps(body["messages"] if "messages" in body else body["prompt"])) // 4 + self.max_tokens
        )

        def attempt() -> dict:
            self.limiter.acquire(estimated_tokens)
            create = self.client.completions if endpoint == "/v1/completions" else self.client.chat.completions
            self.concurrency.acquire()  # the adaptive limit on requests in flight (concurrency.py)
            started = time.monotonic()
            try:
                # One Idempotency-Key per logical request, reused by every retry of it.
                raw = create.with_raw_response.create(**body, extra_headers={"Idempotency-Key": key[:48]})
            except BaseException as exc:
                self.concurrency.release(concurrency_outcome(exc), time.monotonic() - started)
                raise
            self.concurrency.release("ok", time.monotonic() - started, work=completion_work(raw.text))
            self.limiter.observe_headers(raw.headers, in_flight_hint=self.max_workers)
            reply = json.loads(raw.text)  # malformed JSON raises here and is retried
            check(reply)  # a reply we cannot parse is retried too
            return reply

        reply, failure = call_with_retries(
            attempt, self.retry, self.model, self.limiter, on_retry=self._count_retry, refusals=self.refusals
        )
        if failure is not None:
            self.cost.count("failed")
            return None, failure, False
        self.record_paid(key, body, reply)
        self.limiter.settle_tokens(
            estimated_tokens, int((reply.get("usage") or {}).get("total_tokens") or estimated_tokens)
        )
        return reply, None, False

    def record_paid(self, key: str, body: dict, reply: dict, discount: float | None = None) -> None:
        """A paid reply: into the cache and the spend ledger in one transaction, then into the running totals."""
        charge = self.cost.charge(reply.get("usage") or {}, discount)
        if self.cache is not None:
            self.cache.put_paid(key, body, reply, self.run_id, charge)
        self.cost.add(charge)

    def resume_spending(self, run_id: str) -> None:
        """Continue the spend ledger of an earlier run: totals restart from what it recorded as paid."""
        self.run_id = run_id
        if self.cache is not None:
            self.cost.restore(self.cache.spent(run_id))

    def _count_retry(self, reason: str) -> None:  # call_with_retries passes the reason; the count is enough here
        self.cost.count("retries")

    def no_echo_message(self) -> str:
        return (
            f"{self.base_url} cannot score --target-response: it needs a completions endpoint that "
            "returns prompt logprobs with echo=True (vLLM does, api.openai.com does not); use --oracle hf"
        )

    def stats(self) -> dict:
        return {**self.cost.snapshot(), "concurrency_limit": self.concurrency.limit}

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
        if self.cache is not None:
            self.cache.close()


# ---------------------------------------------------------------------------------------------- preflight

PREFLIGHT_TIMEOUT_S = 15.0
# Texts whose greedy continuation is one ordinary word on any LM, for the echo alignment check.
ALIGNMENT_PROBES = ("The capital of France is", "Once upon a time, there was a", "1, 2, 3, 4,")
ALIGNMENT_TOLERANCE = 0.1  # nats; a misaligned echo is off by whole nats, numerical noise by far less


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def served_models(client: openai.OpenAI, base_url: str) -> list[str] | None:
    """The model ids the server lists, or None when it does not list models. A server that cannot be reached
    or refuses the key is a one-line UserError, in seconds rather than after hours of retries."""
    try:
        return sorted(model.id for model in client.models.list())
    except openai.AuthenticationError as exc:
        raise UserError(
            f"authentication failed at {base_url} (HTTP 401): check OPENAI_API_KEY. Server said: {_first_line(exc)}"
        ) from None
    except UNREACHABLE as exc:
        raise UserError(
            f"cannot reach the oracle server at {base_url} ({type(exc).__name__}): is it running, "
            "and is --base-url right?"
        ) from None
    except (openai.APIStatusError, openai.APIResponseValidationError, ValueError, TypeError, AttributeError):
        return None


def echo_alignment(client: openai.OpenAI, model: str, base_url: str) -> float | None:
    """Largest |echoed logprob - generated logprob| over the probes: a server's echo of prompt logprobs is
    compared with the logprob it reports when it generates the same token after the same text. None when no
    probe could be compared (the continuation was empty or did not come back as its own token)."""
    worst = None
    for probe in ALIGNMENT_PROBES:
        try:
            generated = json.loads(
                client.completions.with_raw_response.create(
                    model=model, prompt=probe, max_tokens=1, temperature=0.0, logprobs=1
                ).text
            )
            choice = generated["choices"][0]
            token, logprobs = choice.get("text") or "", (choice.get("logprobs") or {}).get("token_logprobs") or []
            if not token.strip() or not logprobs or logprobs[0] is None:
                continue
            echoed = json.loads(
                client.completions.with_raw_response.create(
                    model=model, prompt=probe + token, max_tokens=1, temperature=0.0, echo=True, logprobs=1
                ).text
            )
        except openai.BadRequestError as exc:
            raise OracleError(
                f"{base_url} cannot score --target-response: its completions endpoint refused a prompt "
                f"logprob request with echo=True ({_first_line(exc)}); use --oracle hf"
            ) from None
        except UNREACHABLE as exc:
            raise UserError(f"cannot reach the oracle server at {base_url} ({type(exc).__name__})") from None
        echo_logprobs = echoed["choices"][0].get("logprobs") or {}
        found = [
            lp
            for offset, lp in zip(echo_logprobs.get("text_offset") or [], echo_logprobs.get("token_logprobs") or [])
            if offset == len(probe) and lp is not None
        ]
        if not found:
            continue
        gap = abs(float(found[0]) - float(logprobs[0]))
        worst = gap if worst is None else max(worst, gap)
    return worst


def preflight(
    model: str, base_url: str | None, timeout_s: float, target_response: str | None = None, check_model: bool = True
) -> list[str]:
    """Checks made once at start-up, before any model is loaded or any paid batch is sent: the server answers,
    it serves `model`, and (with --target-response) its echoed prompt logprobs are aligned. Returns notes to
    print; raises UserError naming the problem."""
    shown_url = base_url or "https://api.openai.com/v1"
    timeout = min(timeout_s, PREFLIGHT_TIMEOUT_S)
    client = openai.OpenAI(api_key=api_key_from_env(base_url), base_url=base_url, timeout=timeout, max_retries=1)
    notes = []
    try:
        models = served_models(client, shown_url)
        if models is None:
            notes.append(f"model check skipped: {shown_url} does not list its models")
        elif check_model and model not in models:
            shown = ", ".join(models[:20]) + (f", ... ({len(models) - 20} more)" if len(models) > 20 else "")
            raise UserError(f"model {model!r} is not served by {shown_url}; it serves: {shown or 'nothing'}")
        if target_response is not None:
            gap = echo_alignment(client, model, shown_url)
            if gap is None:
                notes.append("echo alignment not checked: no probe's continuation came back as its own token")
            elif gap > ALIGNMENT_TOLERANCE:
                raise OracleError(
                    f"{shown_url} echoes prompt logprobs misaligned with its own generation logprobs (off by {gap:.2f} "
                    "nats; llama-cpp-python's server shifts them by one token for models without a BOS token), so "
                    "log p(y*|x) would be wrong: use vLLM, or --oracle hf with the model file"
                )
            else:
                notes.append(f"echo alignment checked: echoed and generated logprobs agree within {gap:.3f} nats")
    finally:
        client.close()
    return notes


# ------------------------------------------------------------------------------------------------- budget


class Budget:
    """--max-cost as the batch sources ask it, once before each paid batch: is there room for one more batch at
    the average cost of the batches so far? A run without a remote oracle or without --max-cost always has."""

    def __init__(self, oracle: "OpenAIChatOracle | None", max_cost: float | None) -> None:
        self.oracle, self.max_cost = oracle, max_cost
        self.batches = 0

    def allows_another_batch(self) -> bool:
        if self.oracle is None or self.max_cost is None:
            return True
        dollars = self.oracle.cost.snapshot()["dollars"]
        per_batch = dollars / self.batches if self.batches else 0.0
        self.batches += 1
        return dollars + per_batch <= self.max_cost

    def stop_reason(self) -> str:
        if self.oracle is None:
            return "budget reached on rank 0"
        return f"budget: ${self.oracle.cost.snapshot()['dollars']:.4f} spent of --max-cost ${self.max_cost}"
