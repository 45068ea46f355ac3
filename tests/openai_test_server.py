"""A real, local HTTP server that speaks enough of the OpenAI REST API for tests.

The official ``openai`` client talks to it over a socket (no client mocking), so
tests exercise the real request building, response parsing and error mapping.

Answers are deterministic functions of the request, and the module-level pure
functions :func:`chat_response_tokens` and :func:`prompt_token_logprobs` compute
them independently of the HTTP layer so tests can derive expected values.

Faults: every request first pops the first applicable entry off
``OpenAITestServer.faults`` (if any). A fault is a callable
``(IncomingRequest) -> Reply | None``; returning a :class:`Reply` replaces the
normal answer (e.g. a 429 with ``retry-after-ms``), returning ``None`` lets the
request proceed normally (e.g. a fault that only sleeps). Faults are consumed
before authentication and before the idempotency layer, so that "the next
request gets fault X" holds regardless of what that request is (they model the
network and gateway in front of the API). ``add_fault(f, match=s)``
queues a fault that only a request whose raw body contains ``s`` consumes (other
requests pass it by), and ``fail_always(rule)`` installs a persistent rule
checked on every request. Factories for the usual failures: :func:`rate_limited`,
:func:`insufficient_quota`, :func:`server_error`, :func:`slow`,
:func:`drop_connection`, :func:`malformed_json`, plus :func:`by_body_hash` to
make a deterministic fraction of requests fail.

Billing: every successful model answer (a 200 chat/completions reply built by
the deterministic model, not a fault and not an idempotent replay) is counted
in ``server.billed`` keyed by :func:`billing_key`, so tests can assert that
nothing was billed twice. A POST whose ``Idempotency-Key`` already completed
successfully gets the stored reply again without being billed (Stripe-style
idempotency; the real OpenAI API may not honour the header, and the official
client does not send one unless given via ``extra_headers``).

Slots: by default every request is served at once after ``latency_s`` (a
server with unlimited parallel slots). With ``slots=k``, at most k model answers
(chat/completions) are computed at once, each holding its slot for
``latency_s``; the others wait in FIFO order, as on a llama.cpp server started
with k slots. A client that sends more requests than slots sees queueing
latency, and with a short timeout it times out; the abandoned request still
takes its turn (the server does not notice the client leave).
``server.peak_in_slots`` is the most answers ever computed at once. Fault
replies and other endpoints do not take a slot. ``honour_idempotency=False``
ignores ``Idempotency-Key`` (llama.cpp and vLLM do): a retry is new work.

Rate limits: normal replies carry OpenAI's ``x-ratelimit-*`` headers computed
from a sliding window; ``enforce_limits=True`` turns exceeding them into 429s.
``server.request_times`` holds the arrival time (``time.monotonic()``) of every
request.

Batch API: ``/v1/files`` (multipart upload, content download) and
``/v1/batches`` (create, retrieve, cancel). A batch completes after
``batch_polls_to_complete`` retrieves; its lines run through the same chat
handler, lines containing "BATCHFAIL" fail into the error file, and the output
file is deterministically shuffled so callers must match by ``custom_id``.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Fault",
    "IncomingRequest",
    "OpenAITestServer",
    "Reply",
    "billing_key",
    "by_body_hash",
    "chat_response_tokens",
    "drop_connection",
    "error_body",
    "format_reset",
    "insufficient_quota",
    "malformed_json",
    "prompt_token_logprobs",
    "rate_limited",
    "server_error",
    "slow",
]

# ---------------------------------------------------------------------------
# Deterministic "model" (pure functions, no HTTP)
# ---------------------------------------------------------------------------

# Vocabulary for generated completions; every generated token is " " + word.
_WORDS: tuple[str, ...] = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "red",
    "green",
    "blue",
    "amber",
)

# OpenAI's documented value for "token not among the top logprobs".
NOT_IN_TOP_LOGPROB = -9999.0
SENTINEL = "SENTINEL"
DEFAULT_MAX_TOKENS = 16
MODEL_IDS: tuple[str, ...] = ("test-chat-model", "test-completion-model", "no-logprobs-model", "gpt-4o-mini")

# Splits a prompt into "tokens" that keep their leading whitespace; the
# concatenation of the pieces is exactly the prompt.
_PROMPT_TOKEN_RE = re.compile(r"\s*\S+|\s+$")


def _sha256(*parts: str) -> bytes:
    # A separator keeps ("ab", "c") and ("a", "bc") distinct.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()


def _unit(digest: bytes) -> float:
    """Map the first 8 bytes of a digest to a float in [0, 1)."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _message_text(message: dict[str, Any]) -> str:
    """Text of a chat message; content may be a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def chat_response_tokens(model: str, messages: list[dict], max_tokens: int) -> tuple[list[str], list[float], str]:
    """Deterministic chat answer: (tokens, logprobs, finish_reason).

    The full response has ``3 + h % 20`` tokens (h = sha256 of model and the
    sorted-key JSON of the messages), so some exceed a small ``max_tokens`` and
    get truncated with finish_reason "length". Each token is " word" with a
    logprob in [-3.0, -0.01]. If any message contains "SENTINEL" the 2nd token's
    logprob is exactly -9999.0 (applied before truncation).
    """
    key = _sha256(model, json.dumps(messages, sort_keys=True))
    n = 3 + int.from_bytes(key, "big") % 20
    tokens: list[str] = []
    logprobs: list[float] = []
    for i in range(n):
        d = hashlib.sha256(key + i.to_bytes(4, "big")).digest()
        tokens.append(" " + _WORDS[d[8] % len(_WORDS)])
        logprobs.append(-0.01 - _unit(d) * 2.99)
    if any(SENTINEL in _message_text(m) for m in messages):
        logprobs[1] = NOT_IN_TOP_LOGPROB
    if n > max_tokens:
        keep = max(max_tokens, 0)
        return tokens[:keep], logprobs[:keep], "length"
    return tokens, logprobs, "stop"


def prompt_token_logprobs(model: str, prompt: str) -> tuple[list[str], list[float | None], list[int]]:
    """Echo scoring of a prompt: (tokens, logprobs, text_offsets).

    Token i's logprob is a float in [-5.0, -0.01] that depends only on the
    prompt prefix up to and including that token (like a causal LM); the first
    token has no logprob (None), as in the real API.
    """
    tokens = _PROMPT_TOKEN_RE.findall(prompt)
    logprobs: list[float | None] = []
    offsets: list[int] = []
    offset = 0
    for i, tok in enumerate(tokens):
        offsets.append(offset)
        end = offset + len(tok)
        logprobs.append(None if i == 0 else -0.01 - _unit(_sha256(model, prompt[:end])) * 4.99)
        offset = end
    return tokens, logprobs, offsets


def _alternatives(token: str, logprob: float, k: int, seed: str) -> list[tuple[str, float]]:
    """Top-k list for one position: the chosen token first (unless it carries
    the "not in top" sentinel), then other words sharing the remaining
    probability mass geometrically, so the listed probabilities sum to < 1."""
    if k <= 0:
        return []
    out: list[tuple[str, float]] = []
    if logprob != NOT_IN_TOP_LOGPROB:
        out.append((token, logprob))
        remaining = 1.0 - math.exp(logprob)
    else:
        remaining = 1.0
    start = _sha256(seed, token)[0]
    candidates = [" " + _WORDS[(start + j) % len(_WORDS)] for j in range(len(_WORDS))]
    j = 0
    for cand in candidates:
        if len(out) >= k:
            break
        if cand == token:
            continue
        j += 1
        out.append((cand, math.log(remaining) - j * math.log(2.0)))
    return out


def _count_words(messages: list[dict]) -> int:
    return sum(len(_message_text(m).split()) for m in messages)


def _estimate_tokens(body: dict[str, Any]) -> int:
    """Tokens a request may use (prompt words + max output), as the API estimates
    before answering; tolerant of malformed bodies, which validation rejects later."""
    messages = body.get("messages")
    prompt = body.get("prompt")
    words = 0
    if isinstance(messages, list):
        words = _count_words([m for m in messages if isinstance(m, dict)])
    elif isinstance(prompt, str):
        words = len(prompt.split())
    max_out = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    return words + (max_out if _is_int(max_out) and max_out > 0 else DEFAULT_MAX_TOKENS)


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI-style error envelope (what the client turns into APIStatusError)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Reply:
    """What the server sends back. ``body`` that is ``bytes`` goes out verbatim
    (room for malformed-JSON faults); anything else is JSON-encoded."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # When True the handler sends nothing and closes the socket (see drop_connection()).
    drop_connection: bool = False


@dataclass
class IncomingRequest:
    method: str
    path: str  # without query string
    headers: Message
    raw_body: bytes
    body: dict[str, Any] | None  # None when the body is not a JSON object
    index: int  # position in OpenAITestServer.requests


Fault = Callable[[IncomingRequest], Reply | None]


# ---------------------------------------------------------------------------
# Fault factories (scripted failures; pass the result to add_fault/fail_always)
# ---------------------------------------------------------------------------


def rate_limited(retry_after_ms: int | None = 50, retry_after_s: float | None = None) -> Fault:
    """429 "rate_limit_exceeded" as the API sends it; the retry hints go in the
    ``retry-after-ms`` / ``retry-after`` headers the official client honours."""
    headers: dict[str, str] = {}
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(int(retry_after_ms))
    if retry_after_s is not None:
        headers["retry-after"] = f"{retry_after_s:g}"

    def fault(req: IncomingRequest) -> Reply:
        return Reply(
            429,
            error_body("Rate limit reached for requests", type_="requests", code="rate_limit_exceeded"),
            dict(headers),
        )

    return fault


def insufficient_quota() -> Fault:
    """429 that must NOT be retried: same status as a rate limit, told apart only by the body."""

    def fault(req: IncomingRequest) -> Reply:
        return Reply(
            429,
            error_body(
                "You exceeded your current quota, please check your plan and billing details.",
                type_="insufficient_quota",
                code="insufficient_quota",
            ),
        )

    return fault


_SERVER_ERROR_MESSAGES: dict[int, str] = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
}


def server_error(status: int = 500) -> Fault:
    """A transient 5xx with an OpenAI-style body (the client maps it to InternalServerError)."""
    if not 500 <= status <= 599:
        raise ValueError(f"server_error needs a 5xx status, got {status}")
    message = _SERVER_ERROR_MESSAGES.get(status, "The server had an error while processing your request.")

    def fault(req: IncomingRequest) -> Reply:
        return Reply(status, error_body(message, type_="server_error"))

    return fault


def slow(seconds: float) -> Fault:
    """Delay one request, then answer it normally, so a client with a shorter
    timeout gives up. The answer is still produced (and billed), as a real
    server does for a request whose client has gone away."""

    def fault(req: IncomingRequest) -> None:
        time.sleep(seconds)
        return None

    return fault


def drop_connection() -> Fault:
    """Close the socket without sending a byte (an abrupt disconnect mid-request)."""

    def fault(req: IncomingRequest) -> Reply:
        return Reply(0, None, drop_connection=True)

    return fault


MALFORMED_JSON_BODY = b'{"id": "chatcmpl-broken", "choi'


def malformed_json() -> Fault:
    """200 with a JSON content type but a truncated body (a proxy cutting a reply short)."""

    def fault(req: IncomingRequest) -> Reply:
        return Reply(200, MALFORMED_JSON_BODY, {"Content-Type": "application/json"})

    return fault


def by_body_hash(fraction: float, fault: Fault, salt: str = "") -> Fault:
    """For fail_always(): apply ``fault`` to a deterministic ``fraction`` of requests.

    The draw hashes (salt, raw body, how often this body was seen before), so a
    run is reproducible yet a retry of the same body gets a fresh draw; hashing
    the body alone would make the unlucky requests fail forever.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    seen: Counter[bytes] = Counter()
    lock = threading.Lock()

    def rule(req: IncomingRequest) -> Reply | None:
        with lock:
            occurrence = seen[req.raw_body]
            seen[req.raw_body] += 1
        digest = hashlib.sha256(
            salt.encode("utf-8") + b"\x1f" + req.raw_body + b"\x1f" + str(occurrence).encode("ascii")
        ).digest()
        return fault(req) if _unit(digest) < fraction else None

    return rule


@dataclass
class _MatchedFault:
    """A queued fault that only a request whose raw body contains ``match`` consumes."""

    fault: Fault
    match: str

    def applies_to(self, req: IncomingRequest) -> bool:
        return self.match.encode("utf-8") in req.raw_body

    def __call__(self, req: IncomingRequest) -> Reply | None:
        return self.fault(req)


def billing_key(raw_body: bytes, idempotency_key: str | None = None) -> str:
    """Key of OpenAITestServer.billed for a request: its Idempotency-Key, else sha256 of the raw body."""
    return idempotency_key if idempotency_key else hashlib.sha256(raw_body).hexdigest()


def format_reset(seconds: float) -> str:
    """Duration formatted like OpenAI's x-ratelimit-reset-* headers (Go style): "20ms", "1.5s", "6m0s"."""
    ms = round(seconds * 1000)  # whole milliseconds first, so 59.9996 s reads "1m0s", not "60s"
    if ms <= 0:
        return "0s" if seconds <= 0 else "1ms"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms / 1000, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{sec_text}s"
    if minutes >= 1:
        return f"{int(minutes)}m{sec_text}s"
    return f"{sec_text}s"


def _bad_request(message: str, param: str | None = None, code: str | None = None) -> Reply:
    return Reply(400, error_body(message, param=param, code=code))


def _is_int(value: Any) -> bool:
    # bool is an int subclass; JSON true must not pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, like the real API; the client pools connections.
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from base class
        pass  # keep test output clean

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the body waits for the
        # client's delayed ACK (~40 ms per request on Linux).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track_connection(self.connection, add=False)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        owner = self.server.owner
        owner._enter()
        try:
            arrived = time.monotonic()
            # Always drain the body so the keep-alive connection stays in sync.
            raw = self._read_body()
            path = urlsplit(self.path).path
            request = owner._record(self.command, path, self.headers, raw, arrived)
            try:
                reply = owner._dispatch(request)
            except Exception as exc:  # surface server bugs as a 500 and keep them for assertions
                owner.errors.append(exc)
                reply = Reply(500, error_body(f"test server error: {exc!r}", type_="server_error"))
            if reply.drop_connection:
                self._drop()
            else:
                self._send(reply)
        finally:
            owner._exit()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            # Clients may stream uploads chunked; decode so the next request on this connection parses.
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _drop(self) -> None:
        # Shut the socket down before any status line is written: the client sees the peer
        # close on a request it is waiting on. close_connection stops the keep-alive loop
        # from reading the next request off the dead socket.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, reply: Reply) -> None:
        payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode("utf-8")
        headers = {"Content-Type": "application/json", "x-request-id": f"req_{uuid.uuid4().hex}", **reply.headers}
        try:
            self.send_response(reply.status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            # The client already gave up (e.g. timed out on a slow() fault); nothing to deliver.
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: "OpenAITestServer"


@dataclass
class _StoredFile:
    """An uploaded (or batch-generated) file: metadata plus its exact bytes."""

    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class _BatchJob:
    data: dict[str, Any]  # the Batch object exactly as returned by the API
    lines: list[dict[str, Any]]  # validated input lines, in file order
    input_digest: bytes  # seeds the deterministic output shuffle
    polls: int = 0


_MODEL_PATHS = ("/v1/chat/completions", "/v1/completions")
_BATCH_ENDPOINTS = _MODEL_PATHS  # endpoints whose requests a batch can hold here
_FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_FAIL_MARKER = "BATCHFAIL"
_FILE_PATH_RE = re.compile(r"^/v1/files/([^/]+)(/content)?$")
_BATCH_PATH_RE = re.compile(r"^/v1/batches/([^/]+)(/cancel)?$")


class _FifoSlots:
    """k slots handed out strictly first come, first served: a release passes its slot to the oldest waiter."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.busy = 0
        self.peak = 0
        self._waiting: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self.busy < self.count and not self._waiting:
                self.busy += 1
                self.peak = max(self.peak, self.busy)
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # the slot is handed over with busy unchanged

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self.busy -= 1

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.busy


class OpenAITestServer:
    """Local OpenAI-compatible server on 127.0.0.1:<ephemeral port>.

    Use as a context manager, or call start()/stop().

    Rate limits: ``rpm_limit`` requests and ``tpm_limit`` tokens per
    ``rate_window_s`` seconds (a sliding window; 60 s like the real API, shorter
    in tests that want the window to free quickly). They are only reported in
    headers unless ``enforce_limits`` is True. Batches complete on the
    ``batch_polls_to_complete``-th retrieve; ``batch_shuffle`` scrambles the
    output line order.
    """

    def __init__(
        self,
        api_key: str = "test-key",
        latency_s: float = 0.0,
        supports_echo: bool = True,
        logprobs_forbidden_models: tuple[str, ...] = ("no-logprobs-model",),
        *,
        rpm_limit: int = 10000,
        tpm_limit: int = 10_000_000,
        enforce_limits: bool = False,
        rate_window_s: float = 60.0,
        batch_polls_to_complete: int = 2,
        batch_shuffle: bool = True,
        slots: int | None = None,
        honour_idempotency: bool = True,
    ) -> None:
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be None or >= 1, got {slots}")
        self.api_key = api_key
        self.latency_s = latency_s
        self.slots = slots
        self._slots = _FifoSlots(slots) if slots is not None else None
        self.honour_idempotency = honour_idempotency
        self.supports_echo = supports_echo
        self.logprobs_forbidden_models = tuple(logprobs_forbidden_models)
        # Like llama-cpp-python's server: /v1/models may be missing, and echoed prompt logprobs may be shifted
        # by one token (each token reported with the logprob the model gives the *next* position).
        self.list_models = True
        self.billed_tokens = 0  # total_tokens of every billed answer
        self.echo_misaligned = False
        self.requests: list[dict] = []
        self.request_times: list[float] = []  # time.monotonic() at arrival, parallel to requests
        self.peak_in_flight = 0
        self.in_flight = 0
        self.faults: list[Fault] = []  # consumed one per request, FIFO (matched faults wait for their request)
        self.always_fault: Fault | None = None  # persistent rule, see fail_always()
        self.errors: list[BaseException] = []  # unexpected exceptions raised while handling
        # Billing ledger: billing key -> number of times a model answer was produced for it.
        self.billed: Counter[str] = Counter()
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        self.enforce_limits = enforce_limits
        self.rate_window_s = rate_window_s
        self.batch_polls_to_complete = batch_polls_to_complete
        self.batch_shuffle = batch_shuffle
        self.files: dict[str, _StoredFile] = {}
        self.batches: dict[str, _BatchJob] = {}
        self.batches_created = 0
        self._lock = threading.Lock()
        # Separate lock so a poll that runs a whole batch never blocks plain requests on _lock.
        self._batch_lock = threading.Lock()
        # Sliding rate window: admission times, and (billing time, tokens) of billed answers.
        self._window_requests: deque[float] = deque()
        self._window_tokens: deque[tuple[float, int]] = deque()
        self._window_token_sum = 0
        # Idempotency-Key -> (path, parsed body or raw bytes, successful reply) for replays.
        self._idempotent: dict[str, tuple[str, Any, Reply]] = {}
        self._idempotent_in_flight: set[str] = set()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "OpenAITestServer":
        if self._httpd is not None:
            return self
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        # Idle keep-alive connections would otherwise keep handler threads
        # blocked on recv; close them so nothing outlives the server.
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- stats -------------------------------------------------------------

    def reset_stats(self) -> None:
        """Forget observations (requests, timings, peak, errors, billing ledger).

        State the API itself would keep survives: stored idempotent replies,
        the rate-limit window, files and batches.
        """
        with self._lock:
            self.requests.clear()
            self.request_times.clear()
            self.peak_in_flight = self.in_flight
            if self._slots is not None:
                self._slots.reset_peak()
            self.errors.clear()
            self.billed.clear()

    def add_fault(self, fault: Fault, match: str | None = None) -> None:
        """Queue a one-shot fault. With ``match``, only the first request whose raw
        body contains that substring consumes it; other requests pass it by."""
        with self._lock:
            self.faults.append(fault if match is None else _MatchedFault(fault, match))

    def fail_always(self, predicate: Fault | None) -> None:
        """Install a persistent rule checked on every request (after queued faults);
        its Reply, if any, replaces the answer. ``None`` removes it."""
        with self._lock:
            self.always_fault = predicate

    def billed_total(self) -> int:
        with self._lock:
            return sum(self.billed.values())

    @property
    def peak_in_slots(self) -> int:
        """The most model answers computed at once (0 without ``slots``)."""
        return self._slots.peak if self._slots is not None else 0

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _exit(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _record(
        self, method: str, path: str, headers: Message, raw: bytes, arrived: float | None = None
    ) -> IncomingRequest:
        body: dict[str, Any] | None = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            body = parsed if isinstance(parsed, dict) else None
        elif method == "GET":
            body = {}
        entry = dict(body) if body is not None else {"_raw": raw.decode("utf-8", "replace")}
        entry["_path"] = path
        entry["_idempotency_key"] = headers.get("Idempotency-Key")
        with self._lock:
            self.requests.append(entry)
            self.request_times.append(time.monotonic() if arrived is None else arrived)
            index = len(self.requests) - 1
        return IncomingRequest(method, path, headers, raw, body, index)

    # -- rate limits -------------------------------------------------------

    def _prune_window(self, now: float) -> None:
        # Caller holds _lock.
        horizon = now - self.rate_window_s
        while self._window_requests and self._window_requests[0] <= horizon:
            self._window_requests.popleft()
        while self._window_tokens and self._window_tokens[0][0] <= horizon:
            self._window_token_sum -= self._window_tokens.popleft()[1]

    def _ratelimit_headers(self) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            self._prune_window(now)
            used_requests = len(self._window_requests)
            used_tokens = self._window_token_sum
            # "Time until the limit resets to its initial state": when the newest usage leaves the window.
            reset_requests = self._window_requests[-1] + self.rate_window_s - now if self._window_requests else 0.0
            reset_tokens = self._window_tokens[-1][0] + self.rate_window_s - now if self._window_tokens else 0.0
        return {
            "x-ratelimit-limit-requests": str(self.rpm_limit),
            "x-ratelimit-remaining-requests": str(max(self.rpm_limit - used_requests, 0)),
            "x-ratelimit-reset-requests": format_reset(reset_requests),
            "x-ratelimit-limit-tokens": str(self.tpm_limit),
            "x-ratelimit-remaining-tokens": str(max(self.tpm_limit - used_tokens, 0)),
            "x-ratelimit-reset-tokens": format_reset(reset_tokens),
        }

    def _admit(self, body: dict[str, Any]) -> Reply | None:
        """Count a model request in the window, or refuse it with a 429 when
        enforce_limits is on and it would exceed the limits (refused requests
        are not counted, so the window frees at a predictable time)."""
        now = time.monotonic()
        with self._lock:
            self._prune_window(now)
            if self.enforce_limits:
                wait: float | None = None
                kind = ""
                used_requests = len(self._window_requests)
                if used_requests + 1 > self.rpm_limit:
                    oldest_needed = self._window_requests[max(used_requests - self.rpm_limit, 0)]
                    wait, kind = oldest_needed + self.rate_window_s - now, "requests"
                else:
                    estimate = _estimate_tokens(body)
                    used_tokens = self._window_token_sum
                    # An empty window always admits, so one oversized request cannot wedge the server.
                    if used_tokens > 0 and used_tokens + estimate > self.tpm_limit:
                        # Walk the window oldest-first until enough tokens would have expired.
                        freed, frees_at = 0, now
                        for frees_at, tokens in self._window_tokens:
                            freed += tokens
                            if used_tokens - freed + estimate <= self.tpm_limit:
                                break
                        wait, kind = frees_at + self.rate_window_s - now, "tokens"
                if wait is not None:
                    wait = max(wait, 0.001)
                    model = body.get("model")
                    if kind == "requests":
                        detail = f"requests per min (RPM): Limit {self.rpm_limit}, Used {used_requests}, Requested 1"
                    else:
                        detail = (
                            f"tokens per min (TPM): Limit {self.tpm_limit}, Used {self._window_token_sum}, "
                            f"Requested {_estimate_tokens(body)}"
                        )
                    message = (
                        f"Rate limit reached for {model} in organization org-test on {detail}. "
                        f"Please try again in {format_reset(wait)}."
                    )
                    return Reply(
                        429,
                        error_body(message, type_=kind, code="rate_limit_exceeded"),
                        {"retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(math.ceil(wait))},
                    )
            self._window_requests.append(now)
        return None

    def _bill(self, key: str, body: dict[str, Any], count_tokens: bool) -> None:
        usage = body.get("usage") or {}
        tokens = int(usage.get("total_tokens") or 0)
        with self._lock:
            self.billed[key] += 1
            self.billed_tokens += tokens
            if count_tokens:
                self._window_tokens.append((time.monotonic(), tokens))
                self._window_token_sum += tokens

    # -- routing -----------------------------------------------------------

    def _take_fault(self, req: IncomingRequest) -> Fault | None:
        # Caller holds _lock. First fault in FIFO order that applies; matched faults wait for their request.
        for i, fault in enumerate(self.faults):
            if not isinstance(fault, _MatchedFault) or fault.applies_to(req):
                return self.faults.pop(i)
        return None

    def _dispatch(self, req: IncomingRequest) -> Reply:
        # With slots, a model answer spends its latency inside a slot (_answer); everything else waits here.
        slotted = self._slots is not None and req.method == "POST" and req.path in _MODEL_PATHS
        if self.latency_s > 0 and not slotted:
            time.sleep(self.latency_s)
        with self._lock:
            fault = self._take_fault(req)
            always = self.always_fault
        for rule in (fault, always):
            if rule is not None:
                reply = rule(req)
                if reply is not None:
                    return reply  # fault replies go out as scripted: no rate-limit headers, no billing
        if req.headers.get("Authorization") != f"Bearer {self.api_key}":
            reply = Reply(401, error_body("Incorrect API key provided", code="invalid_api_key"))
        else:
            reply = self._route_idempotent(req)
        return Reply(reply.status, reply.body, {**self._ratelimit_headers(), **reply.headers}, reply.drop_connection)

    def _route_idempotent(self, req: IncomingRequest) -> Reply:
        """Stripe-style idempotency: a POST whose Idempotency-Key already succeeded
        gets the stored reply again (not billed); one still running gets 409; one
        reused with different parameters gets 400. Failures are not stored, so a
        retry after a failure runs again."""
        key = req.headers.get("Idempotency-Key") if req.method == "POST" and self.honour_idempotency else None
        if not key:
            return self._route(req, None)
        fingerprint = req.body if req.body is not None else req.raw_body
        with self._lock:
            stored = self._idempotent.get(key)
            if stored is None:
                if key in self._idempotent_in_flight:
                    return Reply(
                        409,
                        error_body(
                            "There is currently another in-progress request using this Idempotency-Key. "
                            "Please try again later.",
                            type_="idempotency_error",
                            code="idempotency_key_in_use",
                        ),
                    )
                self._idempotent_in_flight.add(key)
        if stored is not None:
            path, stored_fingerprint, reply = stored
            if path != req.path or stored_fingerprint != fingerprint:
                return _bad_request(
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                    code="idempotency_key_reused",
                )
            return Reply(reply.status, reply.body, {**reply.headers, "Idempotent-Replayed": "true"})
        try:
            reply = self._route(req, key)
            if reply.status == 200:
                with self._lock:
                    self._idempotent[key] = (req.path, fingerprint, reply)
            return reply
        finally:
            with self._lock:
                self._idempotent_in_flight.discard(key)

    def _route(self, req: IncomingRequest, idempotency_key: str | None) -> Reply:
        if req.method == "GET" and req.path == "/v1/models":
            return self._models() if self.list_models else Reply(404, error_body(f"Invalid URL (GET {req.path})"))
        if req.method == "POST" and req.path in _MODEL_PATHS:
            if req.body is None:
                return _bad_request(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                    "using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
                )
            limited = self._admit(req.body)
            if limited is not None:
                return limited
            reply = self._answer(req.path, req.body)
            if reply.status == 200:
                self._bill(billing_key(req.raw_body, idempotency_key), reply.body, count_tokens=True)
            return reply
        if req.path == "/v1/files" and req.method == "POST":
            return self._upload_file(req)
        if match := _FILE_PATH_RE.match(req.path):
            if req.method == "GET":
                return self._get_file(match.group(1), content=bool(match.group(2)))
        if req.path == "/v1/batches":
            if req.method == "POST":
                return self._create_batch(req)
            if req.method == "GET":
                return self._list_batches()
        if match := _BATCH_PATH_RE.match(req.path):
            if req.method == "GET" and not match.group(2):
                return self._retrieve_batch(match.group(1))
            if req.method == "POST" and match.group(2):
                return self._cancel_batch(match.group(1))
        return Reply(404, error_body(f"Invalid URL ({req.method} {req.path})"))

    def _answer(self, path: str, body: dict[str, Any]) -> Reply:
        if self._slots is None:
            return self._model_reply(path, body)
        self._slots.acquire()  # FIFO: waits for every request that arrived before it
        try:
            if self.latency_s > 0:
                time.sleep(self.latency_s)
            return self._model_reply(path, body)
        finally:
            self._slots.release()

    def _model_reply(self, path: str, body: dict[str, Any]) -> Reply:
        return self._chat(body) if path == "/v1/chat/completions" else self._completions(body)

    def _models(self) -> Reply:
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "openai-test-server"} for m in MODEL_IDS
        ]
        return Reply(200, {"object": "list", "data": data})

    def _chat(self, body: dict[str, Any]) -> Reply:
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", param="model")
        if not isinstance(messages, list) or not messages:
            return _bad_request(
                "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
            )
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return _bad_request(
                "Invalid type for 'messages': each message must be an object with a 'role'.",
                param="messages",
                code="invalid_type",
            )
        if body.get("stream"):
            return _bad_request("stream=true is not supported by the test server", param="stream")
        if body.get("n") not in (None, 1):
            return _bad_request("Only n=1 is supported by the test server", param="n")
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if not _is_int(max_tokens) or max_tokens < 1:
            return _bad_request(
                f"Invalid 'max_tokens': integer below minimum value (got {max_tokens!r}).",
                param="max_tokens",
                code="integer_below_min_value",
            )
        want_logprobs = bool(body.get("logprobs"))
        top_k = body.get("top_logprobs")
        if top_k is not None:
            if not _is_int(top_k) or not 0 <= top_k <= 20:
                return _bad_request(
                    "Invalid 'top_logprobs': must be an integer between 0 and 20.", param="top_logprobs"
                )
            if not want_logprobs:
                return _bad_request("Using 'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        if want_logprobs and model in self.logprobs_forbidden_models:
            return Reply(403, error_body("You are not allowed to request logprobs from this model"))

        tokens, logprobs, finish_reason = chat_response_tokens(model, messages, max_tokens)
        choice_logprobs = None
        # As llama.cpp's server does: logprobs=true without top_logprobs returns "logprobs": null.
        if want_logprobs and top_k is not None:
            seed = json.dumps(messages, sort_keys=True)
            content = []
            for tok, lp in zip(tokens, logprobs):
                top = [
                    {"token": t, "logprob": alt_lp, "bytes": list(t.encode("utf-8"))}
                    for t, alt_lp in _alternatives(tok, lp, top_k or 0, seed)
                ]
                content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": top})
            choice_logprobs = {"content": content, "refusal": None}
        prompt_tokens = _count_words(messages)
        return Reply(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_test",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                        "finish_reason": finish_reason,
                        "logprobs": choice_logprobs,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(tokens),
                    "total_tokens": prompt_tokens + len(tokens),
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            },
        )

    def _completions(self, body: dict[str, Any]) -> Reply:
        model = body.get("model")
        prompt = body.get("prompt")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", param="model")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return _bad_request("The test server only supports a single string 'prompt'.", param="prompt")
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if not _is_int(max_tokens) or max_tokens < 0:
            return _bad_request(
                f"Invalid 'max_tokens': integer below minimum value (got {max_tokens!r}).",
                param="max_tokens",
                code="integer_below_min_value",
            )
        echo = bool(body.get("echo"))
        k = body.get("logprobs")
        if k is not None and (not _is_int(k) or not 0 <= k <= 5):
            return _bad_request("Invalid 'logprobs': must be an integer between 0 and 5.", param="logprobs")
        if echo and k is not None and not self.supports_echo:
            return _bad_request("echo with logprobs is not supported for this model", param="echo")

        prompt_tokens, prompt_logprobs, offsets = prompt_token_logprobs(model, prompt)
        if echo and self.echo_misaligned:  # token i reported with token i+1's logprob
            shifted = prompt_token_logprobs(model, prompt + " next")[1]
            prompt_logprobs = [None] + shifted[2 : len(prompt_tokens) + 1]
        choice: dict[str, Any]
        if not echo and k is not None:
            # Generation with logprobs: each generated token's logprob is what echo scoring of prompt + text gives it.
            tokens, _, finish_reason = chat_response_tokens(model, [{"role": "user", "content": prompt}], max_tokens)
            scored = prompt_token_logprobs(model, prompt + "".join(tokens))[1][len(prompt_tokens) :]
            offsets_out = [len(prompt) + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
            choice = {
                "index": 0,
                "text": "".join(tokens),
                "finish_reason": finish_reason,
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": scored,
                    "text_offset": offsets_out,
                    "top_logprobs": [dict(_alternatives(t, lp, k, prompt)) for t, lp in zip(tokens, scored)],
                },
            }
            completion_tokens = len(tokens)
        elif echo and k is not None:
            # Scoring mode (as vLLM): per-token logprobs of the prompt itself, then of any generated tokens.
            gen_tokens, gen_logprobs, finish_reason = (
                chat_response_tokens(model, [{"role": "user", "content": prompt}], max_tokens)
                if max_tokens
                else ([], [], "length")
            )
            gen_offsets = [len(prompt) + sum(len(t) for t in gen_tokens[:i]) for i in range(len(gen_tokens))]
            top: list[dict[str, float] | None] | None = None
            if k > 0:
                top = [None] + [
                    dict(_alternatives(t, float(lp or 0.0), k, prompt))
                    for t, lp in zip(prompt_tokens[1:] + gen_tokens, prompt_logprobs[1:] + gen_logprobs)
                ]
            logprobs = {
                "tokens": prompt_tokens + gen_tokens,
                "token_logprobs": prompt_logprobs + gen_logprobs,
                "text_offset": offsets + gen_offsets,
                "top_logprobs": top,
            }
            choice = {
                "index": 0,
                "text": prompt + "".join(gen_tokens),
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
            completion_tokens = len(gen_tokens)
        else:
            # Plain generation: same deterministic answer as a one-message chat; a "seed" picks another answer, as
            # sampling servers (vLLM, llama.cpp) do at temperature > 0.
            seed = [{"role": "seed", "content": str(body["seed"])}] if body.get("seed") is not None else []
            tokens, _, finish_reason = chat_response_tokens(
                model, [{"role": "user", "content": prompt}, *seed], max_tokens
            )
            text = (prompt if echo else "") + "".join(tokens)
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            completion_tokens = len(tokens)
        return Reply(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(prompt_tokens),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_tokens) + completion_tokens,
                },
            },
        )

    # -- files and batches -------------------------------------------------

    def _upload_file(self, req: IncomingRequest) -> Reply:
        content_type = req.headers.get("Content-Type") or ""
        if not content_type.lower().startswith("multipart/form-data"):
            return _bad_request("Expected a multipart/form-data upload.")
        # The email package is the standard library's remaining MIME parser (cgi is gone);
        # it needs the Content-Type header in front of the body to find the boundary.
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + req.raw_body
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        if message.is_multipart():
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if isinstance(name, str):
                    payload = part.get_payload(decode=True)
                    fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
        if "file" not in fields:
            return _bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose not in _FILE_PURPOSES:
            return _bad_request(f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
        filename, content = fields["file"]
        stored = self._store_file(filename or "upload", purpose, content)
        return Reply(200, stored.to_json())

    def _store_file(self, filename: str, purpose: str, content: bytes) -> _StoredFile:
        stored = _StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, content, int(time.time()))
        with self._lock:
            self.files[stored.id] = stored
        return stored

    def _get_file(self, file_id: str, content: bool) -> Reply:
        with self._lock:
            stored = self.files.get(file_id)
        if stored is None:
            return Reply(404, error_body(f"No such File object: {file_id}", param="id"))
        if content:
            return Reply(200, stored.content, {"Content-Type": "application/octet-stream"})
        return Reply(200, stored.to_json())

    def _create_batch(self, req: IncomingRequest) -> Reply:
        body = req.body
        if body is None:
            return _bad_request("We could not parse the JSON body of your request.")
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        metadata = body.get("metadata")
        if endpoint not in _BATCH_ENDPOINTS:
            return _bad_request(
                f"Invalid value for 'endpoint': {endpoint!r}. Supported: {', '.join(_BATCH_ENDPOINTS)}.",
                param="endpoint",
            )
        if window != "24h":
            return _bad_request(
                f"Invalid value for 'completion_window': {window!r}. Supported values are: '24h'.",
                param="completion_window",
            )
        if metadata is not None and not isinstance(metadata, dict):
            return _bad_request("Invalid type for 'metadata': expected an object.", param="metadata")
        with self._lock:
            stored = self.files.get(input_file_id) if isinstance(input_file_id, str) else None
        if stored is None:
            return Reply(404, error_body(f"No such File object: {input_file_id}", param="input_file_id"))
        lines, problem = _parse_batch_lines(stored.content, endpoint)
        if problem is not None:
            # The real API reports this through a "failed" batch; failing creation is easier to assert on.
            return _bad_request(
                f"Invalid batch input file {input_file_id}: {problem}",
                param="input_file_id",
                code="invalid_batch_input",
            )
        now = int(time.time())
        data: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": metadata,
            "model": lines[0]["body"].get("model"),
            "usage": None,
        }
        with self._lock:
            self.batches[data["id"]] = _BatchJob(data, lines, hashlib.sha256(stored.content).digest())
            self.batches_created += 1
        return Reply(200, json.loads(json.dumps(data)))

    def _list_batches(self) -> Reply:
        with self._lock:
            jobs = list(self.batches.values())
        with self._batch_lock:
            data = [json.loads(json.dumps(job.data)) for job in reversed(jobs)]
        return Reply(
            200,
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            },
        )

    def _retrieve_batch(self, batch_id: str) -> Reply:
        """Each retrieve advances the batch one step; the last step runs it."""
        with self._batch_lock:
            job = self.batches.get(batch_id)
            if job is None:
                return Reply(404, error_body(f"No batch found with id '{batch_id}'.", param="batch_id"))
            data = job.data
            if data["status"] in ("validating", "in_progress", "finalizing"):
                job.polls += 1
                now = int(time.time())
                if data["in_progress_at"] is None:
                    data["in_progress_at"] = now
                needed = max(self.batch_polls_to_complete, 1)
                if job.polls >= needed:
                    self._run_batch(job)
                elif job.polls == needed - 1 and needed >= 3:
                    data["status"], data["finalizing_at"] = "finalizing", now
                else:
                    data["status"] = "in_progress"
            return Reply(200, json.loads(json.dumps(data)))

    def _run_batch(self, job: _BatchJob) -> None:
        # Caller holds _batch_lock. Every line goes through the synchronous handler and is billed
        # once under "batch:<batch id>:<custom_id>"; batch traffic has its own quota, so it does
        # not count against the rate-limit window.
        data = job.data
        results: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        input_tokens = output_tokens = 0
        for line in job.lines:
            body = line["body"]
            if BATCH_FAIL_MARKER in json.dumps(body, ensure_ascii=False):
                reply = _bad_request(
                    f"Request failed on purpose: its body contains {BATCH_FAIL_MARKER!r}.", code="batch_fail"
                )
            else:
                reply = self._model_reply(data["endpoint"], body)
            entry = {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": line["custom_id"],
                "response": {"status_code": reply.status, "request_id": f"req_{uuid.uuid4().hex}", "body": reply.body},
                "error": None,
            }
            if reply.status == 200:
                self._bill(f"batch:{data['id']}:{line['custom_id']}", reply.body, count_tokens=False)
                usage = reply.body.get("usage") or {}
                input_tokens += int(usage.get("prompt_tokens") or 0)
                output_tokens += int(usage.get("completion_tokens") or 0)
                results.append(entry)
            else:
                failures.append(entry)
        if self.batch_shuffle and len(results) > 1:
            # Seeded by the input bytes: reproducible, and never the identity so order-matching fails.
            order = list(range(len(results)))
            random.Random(job.input_digest).shuffle(order)
            if order == sorted(order):
                order = order[1:] + order[:1]
            results = [results[i] for i in order]
        base = data["id"]
        output = self._store_file(f"{base}_output.jsonl", "batch_output", _jsonl(results))
        data["output_file_id"] = output.id
        if failures:
            data["error_file_id"] = self._store_file(f"{base}_error.jsonl", "batch_output", _jsonl(failures)).id
        now = int(time.time())
        if data["finalizing_at"] is None:
            data["finalizing_at"] = now
        data["status"], data["completed_at"] = "completed", now
        data["request_counts"] = {"total": len(job.lines), "completed": len(results), "failed": len(failures)}
        data["usage"] = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }

    def _cancel_batch(self, batch_id: str) -> Reply:
        with self._batch_lock:
            job = self.batches.get(batch_id)
            if job is None:
                return Reply(404, error_body(f"No batch found with id '{batch_id}'.", param="batch_id"))
            data = job.data
            if data["status"] not in ("validating", "in_progress", "finalizing"):
                return _bad_request(f"Cannot cancel a batch with status '{data['status']}'.")
            now = int(time.time())
            # The real API passes through "cancelling"; nothing runs here, so it is immediate.
            data["status"], data["cancelling_at"], data["cancelled_at"] = "cancelled", now, now
            return Reply(200, json.loads(json.dumps(data)))


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode("utf-8") + b"\n" for row in rows)


def _parse_batch_lines(content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], str | None]:
    """Validate a batch input file as the API does; returns (lines, problem naming the line)."""
    lines: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    models: set[str] = set()
    for number, raw_line in enumerate(content.splitlines(), start=1):
        if not raw_line.strip():
            continue  # blank lines (e.g. a trailing newline) are ignored
        try:
            obj = json.loads(raw_line)
        except ValueError:
            return [], f"line {number}: not valid JSON"
        if not isinstance(obj, dict):
            return [], f"line {number}: expected a JSON object"
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return [], f"line {number}: missing or invalid 'custom_id'"
        if custom_id in seen_ids:
            return [], f"line {number}: duplicate custom_id {custom_id!r}"
        if obj.get("method") != "POST":
            return [], f"line {number}: 'method' must be 'POST'"
        if obj.get("url") != endpoint:
            return [], f"line {number}: 'url' must be {endpoint!r} (the batch endpoint), got {obj.get('url')!r}"
        if not isinstance(obj.get("body"), dict):
            return [], f"line {number}: 'body' must be a JSON object"
        models.add(str(obj["body"].get("model")))
        if len(models) > 1:
            return [], f"line {number}: all requests in a batch must use the same model"
        seen_ids.add(custom_id)
        lines.append(obj)
    if not lines:
        return [], "the file contains no requests"
    return lines, None
