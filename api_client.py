"""The OpenAI (or any OpenAI-compatible server) response oracle.

One `openai.OpenAI` client is shared by a pool of `max_workers` threads; its httpx connection pool is sized
to at least the number of workers so that no thread waits for a connection. The API key comes from the
environment only and is never stored on disk or logged.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


def _fatal(exc: openai.APIStatusError, model: str) -> OracleError:
    """A one-line reason for an error that retrying cannot fix. The message never contains the key: the
    server's message is used, and OpenAI redacts keys in its own messages."""
    message = getattr(exc, "message", str(exc)).splitlines()[0]
    if isinstance(exc, openai.AuthenticationError):
        return OracleError(f"authentication failed (HTTP 401): check OPENAI_API_KEY. Server said: {message}")
    if isinstance(exc, openai.PermissionDeniedError) and "logprob" in message.lower():
        return OracleError(f"model {model!r} does not allow logprobs (HTTP 403); use a model that returns them "
                           f"(e.g. gpt-4o-mini, gpt-4o, gpt-4.1-mini) or --oracle hf. Server said: {message}")
    if isinstance(exc, openai.NotFoundError):
        return OracleError(f"model {model!r} or endpoint not found (HTTP 404). Server said: {message}")
    return OracleError(f"oracle request rejected (HTTP {exc.status_code}). Server said: {message}")


def _is_fatal(exc: Exception) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 401, 403, 404, 422)


class OpenAIChatOracle:
    """log p(y|x) from chat completions with logprobs=True, or, with `target_response`, log p(y*|x) from a
    completions endpoint that echoes prompt logprobs (vLLM does; api.openai.com does not)."""

    def __init__(self, model: str, task: Task, temperature: float = 1.0, max_tokens: int | None = None,
                 max_workers: int = 8, base_url: str | None = None, target_response: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_retries: int = 2) -> None:
        if max_workers < 1:
            raise UserError(f"--max-api-workers must be >= 1, got {max_workers}")
        self.model, self.task, self.temperature = model, task, temperature
        self.max_tokens = max_tokens or task.max_response_tokens
        self.target_response = target_response
        self.max_workers = max_workers
        limits = httpx2.Limits(max_connections=max_workers, max_keepalive_connections=max_workers)
        self.client = openai.OpenAI(
            api_key=api_key_from_env(base_url), base_url=base_url, timeout=timeout_s, max_retries=max_retries,
            http_client=openai.DefaultHttpxClient(limits=limits, timeout=timeout_s),
        )
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oracle")

    def score(self, texts: list[str]) -> list[OracleResult]:
        one = self._score_target if self.target_response is not None else self._score_chat
        futures = [self.pool.submit(one, x) for x in texts]
        results = []
        for future in futures:  # in order, so results line up with texts
            results.append(future.result())
        return results

    def _call(self, create, bad_request_hint: str = "", **kwargs):
        """Fatal errors stop the run with a one-line reason; transient ones (after the client's retries)
        become a failed result that training skips and reports."""
        try:
            return create(**kwargs), None
        except openai.APIStatusError as exc:
            if isinstance(exc, openai.BadRequestError) and bad_request_hint:
                raise OracleError(f"{bad_request_hint}. Server said: {exc.message.splitlines()[0]}") from None
            if _is_fatal(exc):
                raise _fatal(exc, self.model) from None
            return None, f"HTTP {exc.status_code}: {exc.message.splitlines()[0]}"
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def _score_chat(self, x: str) -> OracleResult:
        response, error = self._call(
            self.client.chat.completions.create, model=self.model, messages=self.task.messages(x),
            temperature=self.temperature, max_tokens=self.max_tokens, logprobs=True, n=1,
        )
        if error:
            return OracleResult.failed(error)
        choice = response.choices[0]
        if choice.logprobs is None or choice.logprobs.content is None:
            raise OracleError(f"the server returned no logprobs for model {self.model!r}; it must support logprobs=True")
        logprobs = [t.logprob for t in choice.logprobs.content]
        total, saw_sentinel = sum_token_logprobs(logprobs)
        usage = response.usage.model_dump(exclude_none=True) if response.usage else {}
        return OracleResult(
            response=choice.message.content or "", log_likelihood=total, num_tokens=len(logprobs),
            truncated=choice.finish_reason == "length", valid=not saw_sentinel,
            error="logprob_sentinel" if saw_sentinel else None, usage=usage,
        )

    def _score_target(self, x: str) -> OracleResult:
        prompt = self.task.plain_prompt(x)
        full = prompt + self.target_response
        # max_tokens=1: several servers reject 0; the one generated token lies past the target and is ignored.
        response, error = self._call(
            self.client.completions.create, bad_request_hint=self._no_echo_message(), model=self.model,
            prompt=full, max_tokens=1, echo=True,
            logprobs=1, temperature=0.0,
        )
        if error:
            return OracleResult.failed(error)
        logprobs = response.choices[0].logprobs
        if logprobs is None or not logprobs.text_offset or len(logprobs.text_offset) < 2:
            raise OracleError(self._no_echo_message())
        # Tokens that start inside the target. A token straddling the prompt/target boundary is counted with
        # the prompt; with a prompt ending in whitespace or a newline this does not happen in practice.
        picked = [lp for off, lp in zip(logprobs.text_offset, logprobs.token_logprobs)
                  if len(prompt) <= off < len(full) and lp is not None]
        if not picked:
            raise OracleError("the server's echoed tokens do not cover --target-response")
        total, saw_sentinel = sum_token_logprobs(picked)
        usage = response.usage.model_dump(exclude_none=True) if response.usage else {}
        return OracleResult(response=self.target_response, log_likelihood=total, num_tokens=len(picked),
                            valid=not saw_sentinel, error="logprob_sentinel" if saw_sentinel else None, usage=usage)

    def _no_echo_message(self) -> str:
        return (f"{self.client.base_url} cannot score --target-response: it needs a completions endpoint that "
                "returns prompt logprobs with echo=True (vLLM does, api.openai.com does not); use --oracle hf")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
