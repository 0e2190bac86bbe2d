"""barrier() under torchrun: the ranks meet in the agent's store, not in a collective (so the
process group's timeout does not bound one rank's file work); a rank that leaves releases the
others with an error. Ranks are threads here, against a store like torchrun's agent's."""

from __future__ import annotations

import threading
import time

import pytest

from mt_fsdp import distributed


def _ranks(world_size: int, work: dict[int, float], rounds: int) -> dict[int, list[float]]:
    """Each rank's times out of ``rounds`` barriers, rank r sleeping ``work[r]`` before each."""
    passed: dict[int, list[float]] = {rank: [] for rank in range(world_size)}

    def rank_(rank: int) -> None:
        store = distributed.connect_agent_store(distributed.STORE_CONNECT_TIMEOUT)
        for _ in range(rounds):
            time.sleep(work.get(rank, 0.0))
            distributed._store_barrier(store, rank, world_size)
            passed[rank].append(time.monotonic())

    threads = [threading.Thread(target=rank_, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return passed


def test_ranks_wait_in_the_store_for_the_slowest(agent):
    start = time.monotonic()
    passed = _ranks(3, {0: 0.5}, rounds=2)  # rank 0 writes alone for 0.5 s before each
    assert all(len(times) == 2 for times in passed.values())
    for round_ in range(2):
        assert min(times[round_] for times in passed.values()) >= start + 0.5 * (round_ + 1)


def test_a_rank_that_leaves_releases_the_others_with_an_error(agent):
    errors = []

    def wait() -> None:
        store = distributed.connect_agent_store(distributed.STORE_CONNECT_TIMEOUT)
        try:
            distributed._store_barrier(store, 1, 3)
        except RuntimeError as error:
            errors.append(str(error))

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.2)
    distributed.leave_barriers()  # rank 2 (RANK) stops for an error of its own
    waiting.join(10)
    assert not waiting.is_alive()
    assert errors == ["rank 2 ended while rank 1 waited for it at a barrier"]


def test_without_torchrun_there_is_no_store(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed.connect_agent_store(distributed.STORE_CONNECT_TIMEOUT) is None
    distributed.leave_barriers()  # nothing to tell


def _wait_at_barrier(rank: int, world_size: int, outcome: dict[int, str]) -> threading.Thread:
    """Rank ``rank`` waiting at its next barrier in a thread; ``outcome[rank]`` says how it left."""

    def wait() -> None:
        store = distributed.connect_agent_store(distributed.STORE_CONNECT_TIMEOUT)
        try:
            distributed._store_barrier(store, rank, world_size)
            outcome[rank] = "passed"
        except RuntimeError as error:
            outcome[rank] = str(error)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread


@pytest.mark.parametrize("heartbeat", ["still", "ended"])
def test_a_rank_killed_outright_releases_the_others_by_its_heartbeat(agent, monkeypatch, heartbeat):
    """Rank 1 of 3 never comes (killed before it reached the barrier, so it could not leave):
    a heartbeat that stopped moving, or that says the rank ended, ends both waiters' wait."""
    monkeypatch.setattr(distributed, "BARRIER_QUIET_S", 0.5)
    agent.set(distributed.peer_key(1), "7" if heartbeat == "still" else "error")
    outcome: dict[int, str] = {}
    start = time.monotonic()
    waiting = [_wait_at_barrier(rank, 3, outcome) for rank in (0, 2)]
    for thread in waiting:
        thread.join(20)
    # the first look comes once the poll reaches 1 s (0.01 s doubling: 1.27 s in), a still
    # counter is judged BARRIER_QUIET_S after that, then one more poll of 1 s at most
    assert time.monotonic() - start < 1.27 + 0.5 + 2.0
    assert sorted(outcome) == [0, 2]
    assert all(text.startswith("rank 1 ") for text in outcome.values()), outcome
    assert any("rank 1 stopped answering while rank" in text for text in outcome.values())


@pytest.mark.parametrize("heartbeat", ["beating", "absent"])
def test_a_slow_rank_that_beats_or_has_no_heartbeat_is_waited_for(agent, monkeypatch, heartbeat):
    """Rank 1 comes 3 s late, six times BARRIER_QUIET_S: while its counter moves (its file work
    does not stop its heartbeat), or where it has none to judge, the others wait for it."""
    monkeypatch.setattr(distributed, "BARRIER_QUIET_S", 0.5)
    outcome: dict[int, str] = {}
    waiting = [_wait_at_barrier(0, 2, outcome)]
    store = distributed.connect_agent_store(distributed.STORE_CONNECT_TIMEOUT)
    arrive = time.monotonic() + 3.0
    while time.monotonic() < arrive:
        if heartbeat == "beating":
            store.add(distributed.peer_key(1), 1)
        time.sleep(0.1)
    waiting.append(_wait_at_barrier(1, 2, outcome))
    for thread in waiting:
        thread.join(20)
    assert outcome == {0: "passed", 1: "passed"}
