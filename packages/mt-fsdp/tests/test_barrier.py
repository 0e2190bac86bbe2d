"""barrier() under torchrun: the ranks meet in the agent's store, not in a collective (so the
process group's timeout does not bound one rank's file work); a rank that leaves releases the
others with an error. Ranks are threads here, against a store like torchrun's agent's."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from mt_fsdp import distributed


@pytest.fixture
def agent(monkeypatch) -> dist.TCPStore:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "2"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    return store


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
