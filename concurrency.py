"""An adaptive limit on the requests in flight to an OpenAI-compatible server (the ceiling is --max-api-workers).

Why: no fixed number of concurrent requests suits every server. api.openai.com has many parallel slots, so more
requests in flight give more throughput. A llama.cpp server with one slot queues requests FIFO: with 8 in flight,
each waits for up to 7 others, times out, and is retried while the server still computes the abandoned request.
This limit starts low. It grows while replies come back about as fast as a request sent alone, and shrinks when
they do not. `ceiling` is never exceeded. `fixed=True` keeps the limit at the ceiling (the old behaviour).

The rule is a delay-based AIMD in the spirit of TCP Vegas and Netflix's concurrency-limits:

- The reference. A request is "alone" if nothing else of ours was in flight when it was sent: the server did
  not queue it behind us. The caller passes each reply's work (completion tokens + 1), because on many
  servers long replies take longer. The expected latency of a reply of work w is ref(w), the median latency
  of the (up to) 5 replies sent alone, of the last 32, whose work was nearest to w and within a factor of 2.
  If there are none, ref(w) is the median over the 5 nearest of latency × max(1, w / their work): at worst,
  time grows in proportion to work. No model of how time grows with work is fitted. The same rule serves
  servers whose time is per token, servers whose time is per request (the test server), and anything in
  between. A median also shrugs off the odd "alone" request that another of ours overtook on its way to the
  server. To keep that rare, the requests that follow one sent alone wait 10 ms (`head_start_s`), so that it
  reaches the server first. Slow start has few of those replies yet, so there ref(w) takes the fastest
  instead of the median: an overtaken request is only ever slower, never faster. Before anything has been
  sent alone (fixed mode), ref(w) is the fastest latency per unit of work seen, times w.
- Rounds. A round ends once `limit` replies have come back to requests sent since the round began, which is
  about one round trip. Replies to older requests were measured under another limit and are not counted. The
  round's queueing ratio is q = median over its replies of latency / ref(work). With L of our requests in
  flight on a server that has c free slots, q is about L / c: q ≈ 1 means no queueing, and q ≈ 2 means each
  request waited about as long as it was served.
- Slow start (as in TCP). The limit starts at `initial` (1 by default) and doubles after each round with
  q < 1.15. Slow start ends at the ceiling, at the first round with q ≥ 1.15, or at the first overload.
- After slow start, once per round: if q > 2.2, a multiplicative decrease to limit × max(0.5, 1.5 / q), which
  aims for q ≈ 1.5; if q < 1.2, add 1; otherwise hold. The limit grows only if the round actually reached it.
  A caller that sends fewer requests than the limit shows nothing about whether more would queue.
- "overload" (a timeout, HTTP 429 or 503, a connection reset while queued) halves the limit at once. This
  happens at most once per round: an overload of a request that was sent before the last decrease is counted
  but does not decrease the limit again. Afterwards, rounds with q < 1.2 double the limit back up to where it
  was before the cut, and only then add one at a time. An overload that has nothing to do with our load (a
  gateway that throws the odd 429) therefore costs a few rounds, not a slow climb back. A real one, such as
  a timeout in a queue, shows as q ≥ 1.2 and gets no such help. A round with q > 2.2 forgets the old limit.
  "error" changes nothing.

What this gives in batches of 8, as the training loop sends them:

- One slot: the limit settles at 2. The first request of each batch is served at once and the others wait one
  service time, so q ≈ 2 and the limit holds. At 3, q reaches 3 and the limit drops back.
- 4 slots: the limit reaches 8, because with 8 in flight half the requests wait and the median q is 1.5.
- 64 slots, or api.openai.com: the limit reaches the ceiling and stays there. Latency noise that does not grow
  with our own concurrency moves the reference and the round's median alike.

Limits (BENCHMARKS.md, "Adaptive API concurrency"):

- The reference comes only from requests sent alone. The training loop sends one at the start of every batch,
  but a caller that keeps the server saturated all the time never refreshes it.
- Slow start makes the first batch a few round trips long.
- 429s thrown at random, unrelated to load, keep the limit low under continuous load.
- A client whose own CPU is saturated (many workers on few cores) sees latency rise with concurrency, and the
  limit stops below the ceiling there, although more requests in flight would still add throughput. Fixed
  mode suits those cases.
- Nothing here is checkpointed: a resumed run starts again from slow start.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

OUTCOMES = ("ok", "overload", "error")

SLOW_START_BELOW = 1.15  # q under this in slow start: no queueing at all, double
INCREASE_BELOW = 1.2  # q under this afterwards: add one (one slot at limit 2 gives 1.25-1.5, so it holds)
DECREASE_ABOVE = 2.2  # q over this: requests wait well over their own service time (4 slots at 8 give 2 at most)
DECREASE_TOWARDS = 1.5  # the multiplicative decrease aims at this q
HEAD_START_S = 0.01  # others wait this long after a request sent alone (measured: 2 ms let them overtake it, 5 ms not)
ALONE_WINDOW = 32  # replies to requests sent alone that make up the reference
NEIGHBOURS = 5  # ref(w) is the median latency of this many of them, the nearest in work


@dataclass(frozen=True)
class _Permit:
    seq: int  # order of acquisition: separates this round's requests from older ones
    alone: bool  # nothing else of ours was in flight when it was sent
    sent_at: float


class AdaptiveConcurrency:
    """A thread-safe limit on requests in flight: call acquire() before each HTTP attempt, then release() once
    with its outcome. Adaptive by default (see the module docstring); with fixed=True the limit is the
    ceiling."""

    def __init__(
        self,
        ceiling: int,
        fixed: bool = False,
        initial: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        head_start_s: float | None = None,
    ) -> None:
        if int(ceiling) < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = int(ceiling)
        self.fixed = fixed
        self.clock = clock
        self.head_start_s = 0.0 if fixed else (HEAD_START_S if head_start_s is None else head_start_s)
        self._head_start: tuple[int, float] | None = None  # (ticket, until, in time.monotonic) of an alone request
        start = self.ceiling if fixed else min(self.ceiling, max(1, 1 if initial is None else int(initial)))
        self._limit = float(start)  # a float so that 1.5 / q decreases do not collapse to whole steps
        self._slow_start = not fixed and start < self.ceiling
        self._cond = threading.Condition()
        self._local = threading.local()  # this thread's tickets, oldest first, for release() without one
        self._permits: dict[int, _Permit] = {}
        self._in_flight = 0
        self._seq = 0
        self._round_seq = 0  # requests with seq above this were sent in the current round
        self._decrease_seq = 0  # overloads of requests up to this one were caused by a limit already cut
        self._round: list[tuple[float, float]] = []  # (work, latency) of this round's replies
        self._round_peak = 0
        self._alone: deque[tuple[float, float]] = deque(maxlen=ALONE_WINDOW)  # (work, latency) sent alone
        self._min_per_work = math.inf
        self._min_latency = math.inf
        self._recover_to = 0.0  # the limit before the last overload cut(s), regained fast while nothing queues
        self._last_ratio: float | None = None
        self._counts = {
            "acquired": 0,
            "replies": 0,
            "overloads": 0,
            "errors": 0,
            "rounds": 0,
            "increases": 0,
            "decreases": 0,
            "peak_in_flight": 0,
        }
        self._limit_sum = 0

    # ------------------------------------------------------------------------------------------ public API

    @property
    def limit(self) -> int:
        """The number of requests allowed in flight now (1..ceiling)."""
        with self._cond:
            return self._current_limit()

    def acquire(self) -> int:
        """Block until fewer than `limit` requests are in flight, then count one more. Returns a ticket that
        release() needs only when called from another thread or out of this thread's order."""
        with self._cond:
            while True:
                if self._in_flight >= self._current_limit():
                    self._cond.wait()
                    continue
                # Real time (not self.clock): it paces real threads.
                head_start = self._head_start[1] - time.monotonic() if self._head_start else 0.0
                if head_start <= 0:
                    break
                self._cond.wait(head_start)
            self._in_flight += 1
            self._seq += 1
            alone = self._in_flight == 1
            self._permits[self._seq] = _Permit(self._seq, alone, self.clock())
            # The others wait a moment, so that the request sent alone reaches the server first.
            if alone and self.head_start_s > 0:
                self._head_start = (self._seq, time.monotonic() + self.head_start_s)
            elif alone:
                self._head_start = None
            self._tickets().append(self._seq)
            self._counts["acquired"] += 1
            self._counts["peak_in_flight"] = max(self._counts["peak_in_flight"], self._in_flight)
            self._round_peak = max(self._round_peak, self._in_flight)
            self._limit_sum += self._current_limit()
            return self._seq

    def release(
        self, outcome: str, latency_s: float | None = None, work: float = 1.0, ticket: int | None = None
    ) -> None:
        """Count one request out of flight.

        outcome: "ok" for a reply; "overload" for a timeout, HTTP 429 or 503, or a connection reset while
        queued; "error" for anything else, which does not change the limit. latency_s: the attempt's duration;
        if None, the time on `clock` since acquire(). work: the reply's size (for example
        completion tokens + 1), so that latency is compared per unit of work. ticket: what acquire() returned;
        None means the oldest unreleased acquire() on this thread."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if not work > 0:
            raise ValueError(f"work must be > 0, got {work}")
        with self._cond:
            permit = self._take_permit(ticket)
            self._in_flight -= 1
            if self._head_start and self._head_start[0] == permit.seq:
                self._head_start = None  # answered already: nothing left to overtake
            try:
                latency = self.clock() - permit.sent_at if latency_s is None else float(latency_s)
                if outcome == "ok":
                    self._on_reply(permit, max(latency, 0.0), float(work))
                elif outcome == "overload":
                    self._on_overload(permit)
                else:
                    self._counts["errors"] += 1
            finally:
                self._cond.notify_all()  # the limit may have grown by more than one; never leave waiters stuck

    def stats(self) -> dict:
        with self._cond:
            alone = [latency for _, latency in self._alone]
            return {
                "limit": self._current_limit(),
                "ceiling": self.ceiling,
                "fixed": self.fixed,
                "slow_start": self._slow_start,
                "in_flight": self._in_flight,
                **self._counts,
                "mean_limit": self._limit_sum / self._counts["acquired"] if self._counts["acquired"] else None,
                "min_latency_s": None if math.isinf(self._min_latency) else self._min_latency,
                "alone_replies": len(alone),
                "alone_median_latency_s": statistics.median(alone) if alone else None,
                "last_queueing_ratio": self._last_ratio,
            }

    # ------------------------------------------------------------------------------------------- internals

    def _current_limit(self) -> int:
        # Caller holds the lock.
        return self.ceiling if self.fixed else max(1, min(self.ceiling, int(self._limit + 1e-9)))

    def _tickets(self) -> list[int]:
        if not hasattr(self._local, "tickets"):
            self._local.tickets = []
        return self._local.tickets

    def _take_permit(self, ticket: int | None) -> _Permit:
        tickets = self._tickets()
        if ticket is None:
            # Oldest first; drop tickets that another thread has already released by number.
            while tickets and tickets[0] not in self._permits:
                tickets.pop(0)
            if not tickets:
                raise RuntimeError("release() without a matching acquire() on this thread")
            ticket = tickets.pop(0)
        elif ticket in tickets:
            tickets.remove(ticket)
        permit = self._permits.pop(ticket, None)
        if permit is None:
            raise RuntimeError(f"ticket {ticket} was never acquired or is already released")
        return permit

    def _expected(self, work: float) -> float:
        """ref(work): the latency expected of a reply of this work sent alone (see the module docstring)."""
        if not self._alone:
            return 0.0 if math.isinf(self._min_per_work) else self._min_per_work * work
        # A request sent alone can be slowed by one of ours that overtook it on the way to the server, never sped
        # up. Slow start, with few such replies yet, takes the fastest so that it never doubles on a reference
        # inflated that way; afterwards the median, which latency noise does not bias.
        pick = min if self._slow_start else statistics.median
        # Nearest in work first (on a log scale); among equals, the most recent, since the server's speed drifts.
        newest_first = sorted(reversed(self._alone), key=lambda sample: abs(math.log(sample[0] / work)))
        near = [latency for w, latency in newest_first[:NEIGHBOURS] if abs(math.log(w / work)) <= math.log(2)]
        if near:
            return pick(near)
        # None within a factor of 2: assume at worst that time grows in proportion to work, so that a reply
        # longer than any sent alone is not taken for a queued one.
        return pick([latency * max(1.0, work / w) for w, latency in newest_first[:NEIGHBOURS]])

    def _on_reply(self, permit: _Permit, latency: float, work: float) -> None:
        self._counts["replies"] += 1
        self._min_latency = min(self._min_latency, latency)
        self._min_per_work = min(self._min_per_work, latency / work)
        if permit.alone:
            self._alone.append((work, latency))
        if self.fixed or permit.seq <= self._round_seq:
            return  # fixed: observed only; an older request: measured under another limit
        self._round.append((work, latency))
        if len(self._round) >= self._current_limit():
            self._end_round()

    def _end_round(self) -> None:
        ratios = []
        for work, latency in self._round:
            expected = self._expected(work)
            ratios.append(latency / expected if expected > 0 else (1.0 if latency == 0 else math.inf))
        q = statistics.median(ratios)
        self._last_ratio = q
        self._counts["rounds"] += 1
        limit = self._current_limit()
        reached = self._round_peak >= limit
        if q > DECREASE_ABOVE:
            self._decrease(max(0.5, DECREASE_TOWARDS / q))
            self._recover_to = 0.0  # the latency confirms the cut: grow back one at a time
        elif self._slow_start and q < SLOW_START_BELOW:
            if reached:
                self._grow(self._limit * 2)
        else:
            self._slow_start = False
            if q < INCREASE_BELOW and reached:
                # Back towards the limit before an overload cut by doubling while the latency shows no queueing
                # (a 429 or 503 that had nothing to do with our load); beyond it one at a time.
                target = min(self._recover_to, self._limit * 2) if self._limit < self._recover_to else self._limit + 1
                self._grow(target)
        self._new_round()

    def _on_overload(self, permit: _Permit) -> None:
        self._counts["overloads"] += 1
        if self.fixed or permit.seq <= self._decrease_seq:
            return  # sent before the last cut: it says nothing about the limit now
        self._recover_to = max(self._recover_to, self._limit)
        self._decrease(0.5)
        self._new_round()

    def _grow(self, target: float) -> None:
        if self._current_limit() >= self.ceiling:
            self._slow_start = False
            return
        self._limit = min(float(self.ceiling), target)
        self._counts["increases"] += 1
        if self._current_limit() >= self.ceiling:
            self._slow_start = False

    def _decrease(self, factor: float) -> None:
        self._slow_start = False
        self._decrease_seq = self._seq
        before = self._current_limit()
        self._limit = max(1.0, self._limit * factor)
        if self._current_limit() < before:
            self._counts["decreases"] += 1

    def _new_round(self) -> None:
        self._round_seq = self._seq
        self._round = []
        self._round_peak = self._in_flight
