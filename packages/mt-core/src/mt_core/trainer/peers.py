"""When a collective fails: which ranks of the run are gone, and one message that says so.

A rank whose peer is gone sees only a broken connection (gloo: "Connection closed by peer"),
or, where the peer went silent (a node powered off or cut off, a hung process), a collective
that waits until ``collective_timeout``: neither says which rank went. So under torchrun every
rank registers in the agents' key-value store (an agent hosts it, so it outlives the ranks), a
thread of each rank beats a counter there every :data:`BEAT_S` seconds, and a rank that ends
for a reason of its own (an error it reports, a lost peer) writes that there before it goes.

After a failure a rank leaves the process group first, so that peers blocked on it fail at
once too, then calls the roll: a rank whose counter stands still for :data:`QUIET_S` seconds
and that wrote nothing is lost. The lowest rank still there writes the one message for the
run (the ranks lost and their node, the newest complete checkpoint, the command that
resumes); the others wait for it (:data:`SPOKEN_WAIT_S` at most) and end without repeating it.
The message is claimed in the store first (compare-and-set): where the lowest rank comes too
late, the first survivor to claim it speaks instead, and the lowest stays silent. Where another
rank ended with an error of its own, that rank's message is the run's, and the rest end
silently.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from torch.distributed import TCPStore
from torch.distributed.checkpoint.api import CheckpointException

from mt_core.errors import PeerLostError, write_error
from mt_fsdp import latest_checkpoint
from mt_fsdp.distributed import (
    agent_store_address,
    connect_agent_store,
    leave_barriers,
    peer_ended,
    peer_key,
    store_values,
)

__all__ = ["BEAT_S", "QUIET_S", "SPOKEN_WAIT_S", "PeerWatch"]

BEAT_S = 0.5  # how often each rank's counter moves
QUIET_S = 3.0  # a counter standing still this long (six beats) belongs to a rank that is gone
SPOKEN_WAIT_S = 10.0  # how long the other survivors wait for the lowest one's message
STORE_TIMEOUT = timedelta(seconds=2)  # an agent store that does not answer in this is gone


@dataclass(frozen=True)
class _Roll:
    """What the roll call found: the ranks lost, those that ended with an error of their own,
    and where each rank ran (``node`` ``host``)."""

    lost: list[int]
    failed: list[int]
    nodes: dict[int, str]


class PeerWatch:
    """This rank's entry in the roll: its beating counter, and what to say when peers go.

    Inert (every method a no-op, :meth:`explain` None) alone or outside torchrun, where there is
    no store that outlives the ranks."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._address = agent_store_address() if self.world_size > 1 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._address is None:
            return
        with contextlib.suppress(Exception):  # no store: the run goes on, only unexplained
            store = self._connect()
            node = f"{os.environ.get('GROUP_RANK', '?')} {socket.gethostname()}"
            store.set(peer_key(f"node/{self.rank}"), node)
            store.add(peer_key(self.rank), 1)  # registered: counted from now on
            self._thread = threading.Thread(
                target=self._beat, args=(store,), name="mt-peer-beat", daemon=True
            )
            self._thread.start()

    def _connect(self) -> TCPStore:
        return connect_agent_store(STORE_TIMEOUT)

    def _beat(self, store: TCPStore) -> None:
        while not self._stop.wait(BEAT_S):
            # a beat the store did not take in time is not the last: a barrier takes a counter
            # that stopped for good for a dead rank (where the store went with its node, the
            # beats fail until the rank ends)
            with contextlib.suppress(Exception):
                store.add(peer_key(self.rank), 1)

    def close(self) -> None:
        """Stop beating (the run ended, or this rank is about to say why)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def ended_by_own_error(self) -> None:
        """Tell the others that this rank stops for an error it reports itself: they are to end
        quietly, not report it as lost."""
        self._end("error")

    def _end(self, reason: str) -> None:
        self.close()
        if self._address is not None:
            with contextlib.suppress(Exception):
                self._connect().set(peer_key(self.rank), reason)
            leave_barriers(STORE_TIMEOUT)  # ranks waiting for this one's file work stop too

    def explain(self, error: BaseException, output_dir: Path, resume: str) -> PeerLostError | None:
        """After ``error`` in a collective (this rank has left the process group): the error
        to end this rank with when other ranks are gone, their message written once for the
        run; None when every other rank is still there (the error is this rank's own).

        SIGTERM waits meanwhile: torchrun stops the other processes of a node with it as soon
        as one of them ends, which would cut the message short."""
        if self._address is None:
            return None
        with _sigterm_held():
            return self._explain(_cause(error), output_dir, resume)

    def _explain(self, cause: str, output_dir: Path, resume: str) -> PeerLostError | None:
        roll = self._roll_call()
        if roll is None:  # the store went with its node: the first rank of each node speaks
            self._stop.set()  # (the beat may hang on the store until its timeout: not joined)
            message = _message(None, cause, self._address, output_dir / "checkpoints", resume)
            if os.environ.get("LOCAL_RANK", "0") == "0":
                write_error(message)
            return PeerLostError(message)
        if roll.failed:
            self._end("lost")
            ranks = ", ".join(map(str, roll.failed))
            return PeerLostError(f"rank(s) {ranks} stopped with an error of their own: {cause}")
        if not roll.lost:
            return None
        self._end("lost")
        message = _message(roll, cause, self._address, output_dir / "checkpoints", resume)
        survivors = set(range(self.world_size)) - set(roll.lost)
        lowest = self.rank == min(survivors)
        if (lowest or not self._wait_for_message()) and self._claim_message():
            write_error(message)
        return PeerLostError(message)

    def _wait_for_message(self) -> bool:
        """Whether the rank that speaks for the run claimed its message in time."""
        try:
            self._connect().wait([peer_key("spoken")], timedelta(seconds=SPOKEN_WAIT_S))
            return True
        except Exception:
            return False

    def _claim_message(self) -> bool:
        """Whether this rank is the first to claim the run's message (an atomic compare-and-set
        in the store): a survivor that waited in vain speaks, and the lowest one, late to its
        roll call under load, then stays silent (seen once: both wrote it)."""
        try:
            key, mine = peer_key("spoken"), str(self.rank)
            return self._connect().compare_set(key, "", mine) == mine.encode()
        except Exception:
            return True  # no store to ask: a message twice rather than none

    def _roll_call(self) -> _Roll | None:
        """Who is still there: a rank is if its counter moves, or it wrote why it ended, within
        :data:`QUIET_S`. None when the store does not answer (its node is gone too)."""
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        try:
            store = self._connect()
            first = store_values(store, [peer_key(rank) for rank in others])
            heard = {rank for rank, value in zip(others, first, strict=True) if peer_ended(value)}
            deadline = time.monotonic() + QUIET_S
            while len(heard) < len(others) and time.monotonic() < deadline:
                time.sleep(BEAT_S / 2)
                now = store_values(store, [peer_key(rank) for rank in others])
                heard |= {r for r, a, b in zip(others, first, now, strict=True) if a != b}
            last = store_values(store, [peer_key(rank) for rank in others])
            nodes = store_values(store, [peer_key(f"node/{r}") for r in range(self.world_size)])
        except Exception:
            return None
        return _Roll(
            lost=sorted(set(others) - heard),
            failed=[rank for rank, value in zip(others, last, strict=True) if value == b"error"],
            nodes={rank: node.decode() for rank, node in enumerate(nodes) if node is not None},
        )


@contextlib.contextmanager
def _sigterm_held() -> Iterator[None]:
    """SIGTERM ignored inside, its handler put back after (only the main thread sets them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cause(error: BaseException) -> str:
    """The first line of what the collective raised, without gloo's source location."""
    if isinstance(error, CheckpointException):  # torch's checkpoint wraps each rank's failure
        failure = next(iter(error.failures.values()), error)
        error = failure[0] if isinstance(failure, tuple) else failure
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    first = re.sub(r"^\[[^\]]*\] ", "", first)  # "[.../gloo/transport/tcp/pair.cc:561] "
    return first.split(". ")[0][:200]


def _message(
    roll: _Roll | None, cause: str, store: tuple[str, int], checkpoints: Path, resume: str
) -> str:
    """The lost ranks and their nodes, what is intact, and the command that resumes."""
    if roll is None:
        who = (
            f"lost the other ranks and the run's store at {store[0]}:{store[1]}: the node "
            "that holds it (where torchrun's rendezvous runs) is gone"
        )
    else:
        by_node: dict[str, list[int]] = {}
        for rank in roll.lost:
            by_node.setdefault(roll.nodes.get(rank, "? ?"), []).append(rank)
        parts = []
        for node, ranks in by_node.items():
            number, _, host = node.partition(" ")
            parts.append(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} "
                         f"(node {number}, {host})")  # fmt: skip
        who = f"lost {'; '.join(parts)}: ended or stopped answering"
    newest = latest_checkpoint(checkpoints)
    if newest is not None:
        kept, goal = f"the newest complete checkpoint, {newest}, is intact", "to resume"
    else:
        kept, goal = "no checkpoint was written yet", "to start over"
    again = "run the same command again on every node"
    if resume != "auto" and newest is not None:
        again += f' with resume = "auto" (the run file says {resume!r})'
    return (
        f"{who} ({cause})\n{kept}\n"
        f"{goal}, {again} (any number of nodes; --nnodes says how many); on this node: "
        f"{_command()}"
    )


def _command() -> str:
    """The command this rank's node was started with: its torchrun (the parent process), else
    this process's own."""
    words = list(sys.argv)
    with contextlib.suppress(OSError):
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode()
        launcher = parent.rstrip("\0").split("\0")
        for index, word in enumerate(launcher[:3]):
            if Path(word).name == "torchrun" or word == "torch.distributed.run":
                words = ["torchrun", *launcher[index + 1 :]] if index < 2 else launcher
                break
    return shlex.join(words)
