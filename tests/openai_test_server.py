"""A real, local HTTP server that speaks enough of the OpenAI REST API for tests.

The official ``openai`` client talks to it over a socket (no client mocking), so
tests exercise the real request building, response parsing and error mapping.

Answers are deterministic functions of the request, and the module-level pure
functions :func:`chat_response_tokens` and :func:`prompt_token_logprobs` compute
them independently of the HTTP layer so tests can derive expected values.

Faults: every request first pops one entry off ``OpenAITestServer.faults`` (if
any). A fault is a callable ``(IncomingRequest) -> Reply | None``; returning a
:class:`Reply` replaces the normal answer (e.g. a 429 with ``retry-after-ms``),
returning ``None`` lets the request proceed normally (e.g. a fault that only
sleeps). Faults are consumed before authentication so that "the next request
gets fault X" holds regardless of what that request is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import threading
import time
import uuid
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
    "chat_response_tokens",
    "error_body",
    "prompt_token_logprobs",
]

# ---------------------------------------------------------------------------
# Deterministic "model" (pure functions, no HTTP)
# ---------------------------------------------------------------------------

# Vocabulary for generated completions; every generated token is " " + word.
_WORDS: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu", "red", "green", "blue", "amber",
)

# OpenAI's documented value for "token not among the top logprobs".
NOT_IN_TOP_LOGPROB = -9999.0
SENTINEL = "SENTINEL"
DEFAULT_MAX_TOKENS = 16
MODEL_IDS: tuple[str, ...] = ("test-chat-model", "test-completion-model", "no-logprobs-model")

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


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI-style error envelope (what the client turns into APIStatusError)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Reply:
    """What the server sends back. ``body`` that is ``bytes`` goes out verbatim
    (room for malformed-JSON faults); anything else is JSON-encoded."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class IncomingRequest:
    method: str
    path: str  # without query string
    headers: Message
    raw_body: bytes
    body: dict[str, Any] | None  # None when the body is not a JSON object
    index: int  # position in OpenAITestServer.requests


Fault = Callable[[IncomingRequest], Reply | None]


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
            # Always drain the body so the keep-alive connection stays in sync.
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            path = urlsplit(self.path).path
            request = owner._record(self.command, path, self.headers, raw)
            try:
                reply = owner._dispatch(request)
            except Exception as exc:  # surface server bugs as a 500 and keep them for assertions
                owner.errors.append(exc)
                reply = Reply(500, error_body(f"test server error: {exc!r}", type_="server_error"))
            self._send(reply)
        finally:
            owner._exit()

    def _send(self, reply: Reply) -> None:
        payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", "x-request-id": f"req_{uuid.uuid4().hex}", **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: "OpenAITestServer"


class OpenAITestServer:
    """Local OpenAI-compatible server on 127.0.0.1:<ephemeral port>.

    Use as a context manager, or call start()/stop().
    """

    def __init__(self, api_key: str = "test-key", latency_s: float = 0.0, supports_echo: bool = True,
                 logprobs_forbidden_models: tuple[str, ...] = ("no-logprobs-model",)) -> None:
        self.api_key = api_key
        self.latency_s = latency_s
        self.supports_echo = supports_echo
        self.logprobs_forbidden_models = tuple(logprobs_forbidden_models)
        self.requests: list[dict] = []
        self.peak_in_flight = 0
        self.in_flight = 0
        self.faults: list[Fault] = []  # consumed one per request, FIFO
        self.errors: list[BaseException] = []  # unexpected exceptions raised while handling
        self._lock = threading.Lock()
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
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
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
        with self._lock:
            self.requests.clear()
            self.peak_in_flight = self.in_flight
            self.errors.clear()

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

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

    def _record(self, method: str, path: str, headers: Message, raw: bytes) -> IncomingRequest:
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
        with self._lock:
            self.requests.append(entry)
            index = len(self.requests) - 1
        return IncomingRequest(method, path, headers, raw, body, index)

    # -- routing -----------------------------------------------------------

    def _dispatch(self, req: IncomingRequest) -> Reply:
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            reply = fault(req)
            if reply is not None:
                return reply
        if req.headers.get("Authorization") != f"Bearer {self.api_key}":
            return Reply(401, error_body("Incorrect API key provided", code="invalid_api_key"))
        if req.method == "GET" and req.path == "/v1/models":
            return self._models()
        if req.method == "POST" and req.path in ("/v1/chat/completions", "/v1/completions"):
            if req.body is None:
                return _bad_request(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                    "using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
            if req.path == "/v1/chat/completions":
                return self._chat(req.body)
            return self._completions(req.body)
        return Reply(404, error_body(f"Invalid URL ({req.method} {req.path})"))

    def _models(self) -> Reply:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "openai-test-server"}
                for m in MODEL_IDS]
        return Reply(200, {"object": "list", "data": data})

    def _chat(self, body: dict[str, Any]) -> Reply:
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", param="model")
        if not isinstance(messages, list) or not messages:
            return _bad_request("Missing required parameter: 'messages'.", param="messages",
                                code="missing_required_parameter")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return _bad_request("Invalid type for 'messages': each message must be an object with a 'role'.",
                                param="messages", code="invalid_type")
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
            return _bad_request(f"Invalid 'max_tokens': integer below minimum value (got {max_tokens!r}).",
                                param="max_tokens", code="integer_below_min_value")
        want_logprobs = bool(body.get("logprobs"))
        top_k = body.get("top_logprobs")
        if top_k is not None:
            if not _is_int(top_k) or not 0 <= top_k <= 20:
                return _bad_request("Invalid 'top_logprobs': must be an integer between 0 and 20.",
                                    param="top_logprobs")
            if not want_logprobs:
                return _bad_request("Using 'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        if want_logprobs and model in self.logprobs_forbidden_models:
            return Reply(403, error_body("You are not allowed to request logprobs from this model"))

        tokens, logprobs, finish_reason = chat_response_tokens(model, messages, max_tokens)
        choice_logprobs = None
        if want_logprobs:
            seed = json.dumps(messages, sort_keys=True)
            content = []
            for tok, lp in zip(tokens, logprobs):
                top = [{"token": t, "logprob": l, "bytes": list(t.encode("utf-8"))}
                       for t, l in _alternatives(tok, lp, top_k or 0, seed)]
                content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                                "top_logprobs": top})
            choice_logprobs = {"content": content, "refusal": None}
        prompt_tokens = _count_words(messages)
        return Reply(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_test",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                "finish_reason": finish_reason,
                "logprobs": choice_logprobs,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        })

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
            return _bad_request(f"Invalid 'max_tokens': integer below minimum value (got {max_tokens!r}).",
                                param="max_tokens", code="integer_below_min_value")
        echo = bool(body.get("echo"))
        k = body.get("logprobs")
        if k is not None and (not _is_int(k) or not 0 <= k <= 5):
            return _bad_request("Invalid 'logprobs': must be an integer between 0 and 5.", param="logprobs")
        if echo and k is not None and not self.supports_echo:
            return _bad_request("echo with logprobs is not supported for this model", param="echo")

        prompt_tokens, prompt_logprobs, offsets = prompt_token_logprobs(model, prompt)
        choice: dict[str, Any]
        if echo and k is not None:
            # Scoring mode (as vLLM): per-token logprobs of the prompt itself, then of any generated tokens.
            gen_tokens, gen_logprobs, finish_reason = (
                chat_response_tokens(model, [{"role": "user", "content": prompt}], max_tokens) if max_tokens else ([], [], "length"))
            gen_offsets = [len(prompt) + sum(len(t) for t in gen_tokens[:i]) for i in range(len(gen_tokens))]
            top: list[dict[str, float] | None] | None = None
            if k > 0:
                top = [None] + [dict(_alternatives(t, float(lp or 0.0), k, prompt))
                                for t, lp in zip(prompt_tokens[1:] + gen_tokens, prompt_logprobs[1:] + gen_logprobs)]
            logprobs = {"tokens": prompt_tokens + gen_tokens, "token_logprobs": prompt_logprobs + gen_logprobs,
                        "text_offset": offsets + gen_offsets, "top_logprobs": top}
            choice = {"index": 0, "text": prompt + "".join(gen_tokens), "finish_reason": finish_reason,
                      "logprobs": logprobs}
            completion_tokens = len(gen_tokens)
        else:
            # Plain generation: same deterministic answer as a one-message chat.
            tokens, _, finish_reason = chat_response_tokens(model, [{"role": "user", "content": prompt}], max_tokens)
            text = (prompt if echo else "") + "".join(tokens)
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            completion_tokens = len(tokens)
        return Reply(200, {
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
        })
