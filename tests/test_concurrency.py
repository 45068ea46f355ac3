"""AdaptiveConcurrency: the bound on requests in flight (real threads), and the limit's behaviour against
simulated servers (a fake clock and a discrete-event FIFO queue, so it is deterministic and takes no time)."""

import heapq
import math
import random
import threading
import time

import pytest

from concurrency import AdaptiveConcurrency


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(
    ac: AdaptiveConcurrency,
    clock: FakeClock,
    slots: int | None,
    service_s: float = 0.2,
    batches: int = 20,
    batch_size: int = 8,
    timeout_s: float | None = None,
    gap_s: float = 0.5,
    noise: float = 0.0,
    seed: int = 0,
    work=None,
    per_work: bool = True,
    fault_rate: float = 0.0,
) -> dict:
    """The training loop's pattern: batches of `batch_size` requests, never more in flight than ac.limit, the
    next batch once the last reply is in. The server serves FIFO on `slots` slots (None: unlimited), each request
    for service_s (times a lognormal noise factor, and its work if per_work). A request that would take longer
    than timeout_s is an "overload" at timeout_s and is sent again; the server still computes it, as a server
    that does not notice the client leave does. A fraction fault_rate of the answers is an "overload" instead
    (a 429 whatever the load) and is sent again."""
    rng = random.Random(seed)
    free = [0.0] * (slots or 0)
    limits, latencies, timeouts = [], [], 0
    for _ in range(batches):
        pending, flight = batch_size, []
        while pending or flight:
            while pending and len(flight) < ac.limit:
                pending -= 1
                ticket = ac.acquire()
                limits.append(ac.limit)
                w = work(rng) if work else 1.0
                service = service_s * (w if per_work else 1.0) * (math.exp(rng.gauss(0, noise)) if noise else 1.0)
                if slots:
                    slot = min(range(slots), key=free.__getitem__)
                    free[slot] = max(clock.t, free[slot]) + service
                    done = free[slot]
                else:
                    done = clock.t + service
                if timeout_s is not None and done - clock.t > timeout_s:
                    heapq.heappush(flight, (clock.t + timeout_s, ticket, clock.t, w, "overload"))
                else:
                    outcome = "overload" if fault_rate and rng.random() < fault_rate else "ok"
                    heapq.heappush(flight, (done, ticket, clock.t, w, outcome))
            clock.t, ticket, sent, w, outcome = heapq.heappop(flight)
            if outcome == "overload":
                timeouts += 1
                pending += 1
            else:
                latencies.append(clock.t - sent)
            ac.release(outcome, clock.t - sent, work=w, ticket=ticket)
        clock.t += gap_s
    return {"limits": limits, "latencies": latencies, "timeouts": timeouts, "seconds": clock.t}


class PlainAIMD(AdaptiveConcurrency):
    """For comparison: never regains the limit before a cut faster than one at a time."""

    _recover_to = property(lambda self: 0.0, lambda self, value: None)


def run(slots, fixed=False, initial=None, ceiling=8, recover=True, **kwargs):
    clock = FakeClock()
    kind = AdaptiveConcurrency if recover else PlainAIMD
    ac = kind(ceiling, fixed=fixed, initial=initial, clock=clock, head_start_s=0)
    return ac, simulate(ac, clock, slots, **kwargs)


def acquire_now(ac: AdaptiveConcurrency) -> int:
    """acquire() in a single-threaded test: fails instead of blocking for ever."""
    assert ac.stats()["in_flight"] < ac.limit, "acquire() would block"
    return ac.acquire()


# ------------------------------------------------------------------------------------------ real threads


def hammer(ac: AdaptiveConcurrency, threads: int, calls: int, hold_s: float, outcome: str) -> int:
    """Each thread: acquire, hold the slot for hold_s, release with `outcome`. Returns the peak concurrency."""
    lock, state = threading.Lock(), {"active": 0, "peak": 0}

    def worker() -> None:
        for _ in range(calls):
            ac.acquire()
            with lock:
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
            time.sleep(hold_s)
            with lock:
                state["active"] -= 1
            ac.release(outcome, hold_s)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in pool)
    return state["peak"]


def test_threads_never_exceed_the_limit():
    # Every attempt overloads, so the limit stays at 1: eight threads must take turns.
    ac = AdaptiveConcurrency(8)
    assert hammer(ac, threads=8, calls=3, hold_s=0.005, outcome="overload") == 1
    assert ac.limit == 1 and ac.stats()["peak_in_flight"] == 1 and ac.stats()["in_flight"] == 0
    # "error" changes nothing: with the limit at 3, at most (and, with 6 threads holding 20 ms, exactly) 3.
    ac = AdaptiveConcurrency(8, initial=3)
    assert hammer(ac, threads=6, calls=2, hold_s=0.02, outcome="error") == 3
    assert ac.limit == 3 and ac.stats()["errors"] == 12


def test_fixed_mode_fills_the_ceiling_and_never_exceeds_it():
    ac = AdaptiveConcurrency(3, fixed=True)
    assert hammer(ac, threads=6, calls=2, hold_s=0.02, outcome="overload") == 3
    assert ac.limit == 3 and ac.stats()["overloads"] == 12 and ac.stats()["decreases"] == 0


def test_a_request_sent_alone_gets_a_head_start():
    # The others wait head_start_s after it, so it reaches the server first and measures an unqueued latency;
    # once it is answered they go at once.
    def follower_wait(ac: AdaptiveConcurrency, answer_after_s: float | None) -> float:
        ac.acquire()  # alone
        waited = []

        def follower() -> None:
            started = time.monotonic()
            ac.acquire()
            waited.append(time.monotonic() - started)
            ac.release("error", 0.0)

        t = threading.Thread(target=follower)
        t.start()
        if answer_after_s is not None:
            time.sleep(answer_after_s)
            ac.release("error", 0.0)
        t.join(timeout=5)
        return waited[0]

    assert follower_wait(AdaptiveConcurrency(4, initial=4, head_start_s=0.3), None) >= 0.25
    assert follower_wait(AdaptiveConcurrency(4, initial=4, head_start_s=5.0), 0.05) < 1.0
    assert follower_wait(AdaptiveConcurrency(4, fixed=True, head_start_s=5.0), None) < 1.0  # fixed: as before


def test_release_must_match_an_acquire():
    ac = AdaptiveConcurrency(2)
    with pytest.raises(RuntimeError):
        ac.release("ok", 0.1)
    ticket = ac.acquire()
    with pytest.raises(ValueError):
        ac.release("timeout", 0.1)  # not an outcome; nothing released
    with pytest.raises(ValueError):
        ac.release("ok", 0.1, work=0)
    assert ac.stats()["in_flight"] == 1
    ac.release("ok", 0.1, ticket=ticket)
    with pytest.raises(RuntimeError):
        ac.release("ok", 0.1, ticket=ticket)
    with pytest.raises(ValueError):
        AdaptiveConcurrency(0)


# ------------------------------------------------------------------------------------- the limit's rule


def test_overload_halves_at_most_once_per_round():
    clock = FakeClock()
    ac = AdaptiveConcurrency(8, initial=8, clock=clock, head_start_s=0)
    tickets = [acquire_now(ac) for _ in range(8)]
    ac.release("overload", 1.0, ticket=tickets[0])
    assert ac.limit == 4
    ac.release("overload", 1.0, ticket=tickets[1])  # sent before the cut: counted, not cut again
    assert ac.limit == 4 and ac.stats()["overloads"] == 2 and ac.stats()["decreases"] == 1
    for t in tickets[2:]:
        ac.release("error", 1.0, ticket=t)
    fresh = acquire_now(ac)  # sent after the cut: its overload cuts again
    ac.release("overload", 1.0, ticket=fresh)
    assert ac.limit == 2
    for _ in range(3):
        acquire_now(ac)
        ac.release("overload", 1.0)
    assert ac.limit == 1 and ac.stats()["decreases"] == 3  # never below 1


def test_replies_to_requests_sent_before_a_change_do_not_count_in_the_next_round():
    ac = AdaptiveConcurrency(8, initial=8, clock=FakeClock(), head_start_s=0)
    tickets = [acquire_now(ac) for _ in range(8)]
    ac.release("ok", 1.0, ticket=tickets[0])  # sent alone: the reference, 1 s
    ac.release("overload", 1.0, ticket=tickets[1])
    assert ac.limit == 4
    for t in tickets[2:]:
        ac.release("ok", 4.0, ticket=t)  # queued under the old limit of 8: no second cut
    assert ac.limit == 4 and ac.stats()["decreases"] == 1 and ac.stats()["rounds"] == 0
    for _ in range(4):
        acquire_now(ac)
    for _ in range(4):
        ac.release("ok", 1.0)  # the new limit's own round shows no queueing: back to the limit before the cut
    assert ac.limit == 8 and ac.stats()["rounds"] == 1


def test_slow_start_then_the_ceiling_with_constant_latency():
    ac, sim = run(slots=None)
    limits = sim["limits"]
    # 1, doubled after each round of replies without queueing (a reply frees a slot before its round ends)
    assert limits[:9] == [1, 2, 2, 2, 4, 4, 4, 4, 8]
    assert set(limits[8:]) == {8} and max(limits) == 8
    stats = ac.stats()
    assert stats["decreases"] == 0 and stats["peak_in_flight"] == 8 and not stats["slow_start"]


def test_four_slots_reach_the_ceiling_and_stay():
    ac, sim = run(slots=4)
    assert set(sim["limits"][16:]) == {8} and ac.stats()["decreases"] == 0
    assert sim["timeouts"] == 0 and max(sim["latencies"]) == pytest.approx(0.4)  # one service time waited


def test_one_slot_queue_settles_at_one_or_two_without_timeouts():
    # From the default start: slow start stops at 2, where each request waits one service time.
    ac, sim = run(slots=1, timeout_s=1.0)
    assert max(sim["limits"]) == 2 and set(sim["limits"][-24:]) <= {1, 2}
    assert sim["timeouts"] == 0 and max(sim["latencies"]) <= 0.4 + 1e-9
    # From 8 in flight (a fixed pool's first batch): it shrinks within a few batches and then stops timing out.
    ac, sim = run(slots=1, initial=8, timeout_s=1.0)
    assert ac.stats()["decreases"] >= 2 and set(sim["limits"][-24:]) <= {1, 2}
    assert ac.limit in (1, 2) and sim["timeouts"] <= 8
    # The same server with a fixed 8: every batch times out and retries.
    fixed, fixed_sim = run(slots=1, fixed=True, timeout_s=1.0)
    assert set(fixed_sim["limits"]) == {8} and fixed_sim["timeouts"] > 50
    assert fixed_sim["seconds"] > 1.3 * sim["seconds"]


def test_queueing_that_grows_with_in_flight_count_shrinks_the_limit():
    # Six sent at once to one slot of 0.2 s: the i-th waits for the i - 1 before it. The first, sent alone,
    # gives the reference.
    clock = FakeClock()
    ac = AdaptiveConcurrency(8, initial=6, clock=clock, head_start_s=0)
    tickets = [acquire_now(ac) for _ in range(6)]
    for i, t in enumerate(tickets):
        ac.release("ok", 0.2 * (i + 1), ticket=t)  # median 0.7 s: q = 3.5
    assert ac.limit == 3  # 6 × max(0.5, 1.5 / 3.5)
    assert ac.stats()["last_queueing_ratio"] == pytest.approx(3.5)


def test_latency_is_compared_per_unit_of_work():
    # A server that takes 1 s per unit of work. Replies sent alone, of work 1 and 3, give ref(1) = 1, ref(3) = 3.
    ac = AdaptiveConcurrency(8, clock=FakeClock(), head_start_s=0)
    for i in range(10):
        work = 1 + 2 * (i % 2)
        acquire_now(ac)
        ac.release("ok", float(work), work=work)
    assert ac.limit == 2  # slow start doubled once; one request at a time never reached 2
    for size in (2, 4):
        tickets = [acquire_now(ac) for _ in range(size)]
        for t in tickets:
            ac.release("ok", 3.0, work=3, ticket=t)  # 3 s for 3 units: no queueing, double
    assert ac.limit == 8 and ac.stats()["decreases"] == 0
    tickets = [acquire_now(ac) for _ in range(8)]
    ac.release("ok", 1.0, work=1, ticket=tickets[0])
    for t in tickets[1:]:
        ac.release("ok", 3.0, work=1, ticket=t)  # 3 s for 1 unit: queueing
    assert ac.limit == 4 and ac.stats()["decreases"] == 1


@pytest.mark.parametrize("per_work", [True, False])
def test_replies_of_different_lengths_are_not_taken_for_queueing(per_work):
    # Replies of 1-20 units of work, served in time proportional to their work (a ≈ 0) or in the same time
    # whatever their length (b ≈ 0, the test server): neither looks like queueing.
    ac, sim = run(slots=None, batches=30, work=lambda rng: rng.randint(1, 20), per_work=per_work)
    assert set(sim["limits"][8:]) == {8} and ac.stats()["decreases"] == 0
    # ... while the same replies queued on one slot are
    ac, sim = run(slots=1, batches=30, work=lambda rng: rng.randint(1, 20), per_work=per_work, service_s=0.02)
    tail = sim["limits"][len(sim["limits"]) // 2 :]
    assert max(tail) <= 4 and sum(tail) / len(tail) <= 3


def test_no_growth_without_use():
    # One request at a time never tests whether two would queue: the limit stays where slow start left it.
    ac, sim = run(slots=None, batch_size=1)
    assert set(sim["limits"][1:]) == {2} and ac.limit == 2
    # The same after slow start (ended here by an overload): additive increase needs the limit reached too.
    ac = AdaptiveConcurrency(8, initial=4, clock=FakeClock(), head_start_s=0)
    acquire_now(ac)
    ac.release("overload", 1.0)
    assert ac.limit == 2 and not ac.stats()["slow_start"]
    for _ in range(10):
        acquire_now(ac)
        ac.release("ok", 1.0)
    assert ac.limit == 2 and ac.stats()["rounds"] == 5
    for _ in range(2):
        acquire_now(ac)
    for _ in range(2):
        ac.release("ok", 1.0)
    assert ac.limit == 4  # no queueing: doubled back to where the overload found it
    for _ in range(4):
        acquire_now(ac)
    for _ in range(4):
        ac.release("ok", 1.0)
    assert ac.limit == 5  # and from there one at a time


def test_latency_noise_that_does_not_grow_with_concurrency_keeps_the_ceiling():
    # Lognormal noise (σ = 0.5: the slowest of 8 replies often 3× the fastest) and replies of 1-20 units of work.
    for seed in range(3):
        ac, sim = run(slots=None, batches=50, noise=0.5, seed=seed, work=lambda rng: rng.randint(1, 20))
        tail = sim["limits"][len(sim["limits"]) // 2 :]
        assert sum(tail) / len(tail) >= 7.5 and ac.limit == 8


def test_an_overload_without_queueing_costs_little_and_one_with_queueing_is_not_undone():
    # 10% of answers are a 429 whatever the load (many slots): each halves the limit, and the next round with
    # no queueing doubles it back, so the limit stays high ...
    ac, sim = run(slots=None, batches=40, fault_rate=0.1)
    assert ac.stats()["overloads"] > 20 and ac.stats()["decreases"] > 10
    assert sum(sim["limits"]) / len(sim["limits"]) >= 5.5
    # ... while plain AIMD (one at a time after every cut) would sit far lower
    plain, plain_sim = run(slots=None, batches=40, fault_rate=0.1, recover=False)
    assert sum(plain_sim["limits"]) / len(plain_sim["limits"]) < sum(sim["limits"]) / len(sim["limits"]) - 1
    # Timeouts on one slot: the rounds after the cut still queue, so the limit is not doubled back to 8.
    ac, sim = run(slots=1, initial=8, timeout_s=1.0, batches=10)
    assert set(sim["limits"][-24:]) <= {1, 2}


def test_a_cut_confirmed_by_queueing_is_not_doubled_back():
    ac = AdaptiveConcurrency(8, initial=8, clock=FakeClock(), head_start_s=0)
    tickets = [acquire_now(ac) for _ in range(8)]
    ac.release("ok", 1.0, ticket=tickets[0])  # sent alone: the reference
    ac.release("overload", 1.0, ticket=tickets[1])
    for t in tickets[2:]:
        ac.release("error", 1.0, ticket=t)
    assert ac.limit == 4
    tickets = [acquire_now(ac) for _ in range(4)]
    ac.release("ok", 1.0, ticket=tickets[0])  # sent alone
    for t in tickets[1:]:
        ac.release("ok", 3.0, ticket=t)  # q = 3: the latency confirms the overload
    assert ac.limit == 2
    for _ in range(2):
        acquire_now(ac)
    for _ in range(2):
        ac.release("ok", 1.0)
    assert ac.limit == 3  # one at a time now, not doubled towards the 8 before the first cut


def test_slow_start_does_not_double_on_an_overtaken_request():
    # The request sent alone reached the server second (the other overtook it), so it waited: slow start
    # compares with the fastest reply sent alone, sees the queueing, and stops at 2.
    ac = AdaptiveConcurrency(8, clock=FakeClock(), head_start_s=0)
    acquire_now(ac)
    ac.release("ok", 1.0)
    alone, other = acquire_now(ac), acquire_now(ac)
    ac.release("ok", 1.0, ticket=other)
    ac.release("ok", 2.0, ticket=alone)
    assert ac.limit == 2 and not ac.stats()["slow_start"]


def test_fixed_mode_never_changes():
    ac, sim = run(slots=1, fixed=True, timeout_s=1.0, batches=5)
    assert set(sim["limits"]) == {8} and ac.limit == 8
    stats = ac.stats()
    assert stats["overloads"] == sim["timeouts"] > 0 and stats["decreases"] == stats["increases"] == 0
    assert stats["mean_limit"] == 8
