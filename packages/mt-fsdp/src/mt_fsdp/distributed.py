"""The process group and device of this rank, from torchrun's environment or for one process.

FSDP2 always needs a process group and a device mesh, even for one process; a single process
(no torchrun) gets an in-memory store of world size 1, so no port is opened. The process group
is the only global state mt keeps.

The ranks form one device mesh, built here: FSDP2 shards over all of them (``mesh``, one
dimension); with sequence parallelism, ``sequence_parallel_size`` consecutive ranks (the fastest
links: on one node) also form a group that computes each packed row together
(``sequence_group``). The train loop asks the context for groups and never builds its own.

:func:`barrier` waits for one rank's file work (an export, a checkpoint's rename); under torchrun
it waits in torchrun's agent store, not in a collective, so ``init_distributed``'s ``timeout``
(meant for lost ranks) does not bound how long a file system may take.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "DistContext",
    "agent_store_address",
    "barrier",
    "connect_agent_store",
    "init_distributed",
    "leave_barriers",
    "peer_ended",
    "peer_key",
    "shutdown_distributed",
    "store_values",
]

# How long barrier() waits in torchrun's store for the last rank. Its waits are for one rank's
# file work, not for a collective: rank 0 writing a whole HF export (141 GB for a 70B model:
# minutes, more on a slow file system), renaming a checkpoint, deleting old ones. The run's
# collective_timeout, which bounds how long a lost node holds the GPUs, must not end a healthy
# run there; this bound only keeps a rank from waiting forever.
BARRIER_TIMEOUT = timedelta(hours=2)
# how long a rank waits for torchrun's store to accept it (it answers at once while the job runs)
STORE_CONNECT_TIMEOUT = timedelta(seconds=30)
_POLL_S = (0.01, 1.0)  # barrier()'s look at the store: first after 10 ms, then doubling to 1 s
# A rank a barrier waits for whose heartbeat (peer_key) stands still this long is gone. Its
# heartbeat thread moves it every half second whatever the rank's main thread does (file work
# holds no lock on it), so twenty missed beats are a dead process, not a slow one; the lost-node
# bound of docs/cluster.md (30 s) holds this, the roll call after it and the exit.
BARRIER_QUIET_S = 10.0


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # every rank: what FSDP2 shards over
    sequence_parallel_size: int = 1
    sequence_group: dist.ProcessGroup | None = None  # this rank's group when the size is > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes shared files (metrics, exports) and talks to the user."""
        return self.rank == 0

    @property
    def sequence_rank(self) -> int:
        """This rank's place in its sequence-parallel group: which part of each row it holds."""
        return self.rank % self.sequence_parallel_size

    @property
    def data_parallel_size(self) -> int:
        """How many groups take their own share of each batch."""
        return self.world_size // self.sequence_parallel_size


def _pick_device(local_rank: int, device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(
    device: str = "auto", sequence_parallel_size: int = 1, timeout: timedelta | None = None
) -> DistContext:
    """Join the job torchrun started (RANK/WORLD_SIZE set) or start a one-process group.

    ``device`` is "auto" (CUDA when present, else CPU), "cuda" or "cpu". NCCL serves CUDA, gloo
    the CPU. ``sequence_parallel_size`` must divide the world size (ValueError otherwise, before
    any group is made). ``timeout`` bounds each collective's wait for the other ranks (NCCL's
    watchdog ends the process after it, gloo raises); None keeps PyTorch's default (10 minutes
    with NCCL, 30 with gloo).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if sequence_parallel_size < 1 or world_size % sequence_parallel_size:
        raise ValueError(
            f"{sequence_parallel_size} does not divide the {world_size} process(es) of this "
            f"run; choose a divisor of {world_size}, or start a multiple of "
            f"{sequence_parallel_size} processes"
        )
    target = _pick_device(local_rank, device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    # the group is bound to this rank's GPU, so its collectives (barriers, those of torch's
    # distributed checkpoints) need not guess the device, and torch does not warn that it did
    device_id = target if backend == "nccl" else None
    if not dist.is_initialized():
        store = _fresh_group_store(rank, timeout) if world_size > 1 else None
        if store is not None or "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, device_id=device_id,
                timeout=timeout,
            )  # fmt: skip
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id
            )
    mesh = init_device_mesh(target.type, (dist.get_world_size(),))
    sequence_group = None
    if sequence_parallel_size > 1:
        # (data, sequence): ranks that differ only in the last coordinate are consecutive
        grid = init_device_mesh(
            target.type,
            (world_size // sequence_parallel_size, sequence_parallel_size),
            mesh_dim_names=("data", "sequence"),
        )
        sequence_group = grid["sequence"].get_group()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=target,
        mesh=mesh,
        sequence_parallel_size=sequence_parallel_size,
        sequence_group=sequence_group,
    )


def _fresh_group_store(rank: int, timeout: timedelta | None) -> dist.Store | None:
    """Under torchrun, torchrun's agent store under a prefix of this process group's own (None
    elsewhere). A second run in the same job (``train()`` called again) then meets its peers
    under new keys: torch names every new default group alike, and its ranks would read the
    addresses the last group left in the store and wait for them until the timeout. The ranks
    number their groups in the store, each counting its own; all make the same groups, so the
    numbers agree. The group's ranks wait for each other there up to ``timeout`` (None: torch's
    default), as in a group torch connects itself: nodes may start far apart."""
    store = connect_agent_store(STORE_CONNECT_TIMEOUT)
    if store is None:
        return None
    store.set_timeout(timeout if timeout is not None else default_pg_timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    number = store.add(f"mt/groups/{restart}/rank{rank}", 1)
    return dist.PrefixStore(f"mt/group/{restart}/{number}", store)


def agent_store_address() -> tuple[str, int] | None:
    """Where torchrun's agent keeps its key-value store for the ranks (None: not started by
    torchrun). The agent holds it, so it outlives the ranks (and a restarted job keeps it:
    keys name ``TORCHELASTIC_RESTART_COUNT``)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def connect_agent_store(timeout: timedelta) -> dist.TCPStore | None:
    """A connection to torchrun's agent store (None outside torchrun); ``timeout`` bounds the
    connect and each request without a timeout of its own. Raises when the store does not
    answer."""
    address = agent_store_address()
    if address is None:
        return None
    return dist.TCPStore(address[0], address[1], is_master=False, timeout=timeout)


def _barrier_prefix() -> str:
    return f"mt/barrier/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group).

    Under torchrun the ranks meet in torchrun's agent store, for :data:`BARRIER_TIMEOUT` at
    most, not in a collective: what they wait for is one rank's file work (rank 0 writing an
    export, renaming a checkpoint), which may take longer than the process group's timeout
    without anything being wrong. Each rank numbers its barriers with a counter kept in the
    store; the rank that arrives last at barrier N marks it done.

    A rank that ends while the others wait here is noticed where mt's error handling runs in it
    (an error it raises, a failed collective: :func:`leave_barriers`), or where torchrun's store
    goes with it (the store's node, where rank 0 runs: node 0 of a static rendezvous, usually
    the c10d host); the others then raise within seconds (within
    :data:`STORE_CONNECT_TIMEOUT` where the store's node went silent). A process killed
    outright (SIGKILL, out of memory) on a node other than the store's tells nobody: the ranks
    waiting for it raise once its heartbeat (:func:`peer_key`, which mt_core's trainer moves)
    has stood still for :data:`BARRIER_QUIET_S`. A rank without a heartbeat is waited for up to
    :data:`BARRIER_TIMEOUT`.

    Without torchrun's store (one process, another launcher) it is a collective barrier, bounded
    by the process group's timeout. On NCCL it names this rank's GPU, which a group made
    elsewhere may not be bound to: torch would take the current device and warn that it
    guessed."""
    if not dist.is_initialized():
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    own_group = os.environ.get("RANK") == str(rank) and os.environ.get("WORLD_SIZE") == str(
        world_size
    )
    store = connect_agent_store(STORE_CONNECT_TIMEOUT) if world_size > 1 and own_group else None
    if store is not None:
        _store_barrier(store, rank, world_size)
    elif dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _store_barrier(store: dist.TCPStore, rank: int, world_size: int) -> None:
    prefix = _barrier_prefix()
    number = store.add(f"{prefix}/rank{rank}", 1)  # this rank's barriers so far, this one included
    done = f"{prefix}/{number}/done"
    if store.add(f"{prefix}/{number}", 1) == world_size:
        store.set(done, "1")
        return
    # polled, not store.wait: a wait that times out logs warnings, and leave_barriers must be
    # noticed meanwhile
    deadline = time.monotonic() + BARRIER_TIMEOUT.total_seconds()
    pause = _POLL_S[0]
    beats: dict[int, tuple[bytes, float]] = {}  # rank waited for: its heartbeat, seen since when
    while not store.check([done]):
        if store.check([f"{prefix}/left"]):
            gone = store.get(f"{prefix}/left").decode()
            raise RuntimeError(f"rank {gone} ended while rank {rank} waited for it at a barrier")
        if pause == _POLL_S[1]:  # a wait of a second or more: is a rank still to come dead?
            counts = [f"{prefix}/rank{other}" for other in range(world_size)]
            if not store.check(counts):  # a rank not at any barrier yet counts 0: its key made
                for key in counts:  # now lets each later poll ask for all in one request
                    store.add(key, 0)
            late = [other for other, count in enumerate(store.multi_get(counts))
                    if int(count) < number]  # fmt: skip
            dead = _stopped_beating(store, late, beats)
            if dead is not None:
                store.set(f"{prefix}/left", str(dead))  # the other waiters stop at once too
                raise RuntimeError(
                    f"rank {dead} stopped answering while rank {rank} waited for it at a barrier"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {rank} waited {BARRIER_TIMEOUT} at a barrier for the other ranks"
            )
        time.sleep(pause)
        pause = min(2 * pause, _POLL_S[1])


def _stopped_beating(
    store: dist.TCPStore, ranks: list[int], beats: dict[int, tuple[bytes, float]]
) -> int | None:
    """The first of ``ranks`` that is dead: its heartbeat says it ended, or has not moved for
    :data:`BARRIER_QUIET_S` since ``beats`` (updated here) first saw its value. A rank with no
    heartbeat in the store is not judged."""
    now = time.monotonic()
    for other, value in zip(ranks, store_values(store, [peer_key(r) for r in ranks]), strict=True):
        if value is None:
            continue
        seen, since = beats.get(other, (None, now))
        if peer_ended(value) or (value == seen and now - since >= BARRIER_QUIET_S):
            return other
        if value != seen:
            beats[other] = (value, now)
    return None


def store_values(store: dist.TCPStore, keys: list[str]) -> list[bytes | None]:
    """The values of ``keys`` in one request where all exist (every poll of every waiting rank
    asks the one store: hundreds of ranks); None for a key never written."""
    if store.check(keys):
        return store.multi_get(keys)
    return [store.get(key) if store.check([key]) else None for key in keys]


def peer_key(name: int | str) -> str:
    """A key of the ranks' roll in torchrun's store: ``peer_key(rank)`` is that rank's heartbeat,
    a counter its trainer moves every half second, or a word once it ended (why); other names
    are the roll's own entries. Restarted jobs get keys of their own."""
    return f"mt/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def peer_ended(value: bytes | None) -> bool:
    """Whether a heartbeat's value (:func:`peer_key`) says its rank ended: a word, not a count."""
    return value is not None and not value.isdigit()


def leave_barriers(timeout: timedelta = timedelta(seconds=2)) -> None:
    """Tell the ranks waiting in :func:`barrier` (or about to) that this rank ends and will not
    come: they raise instead of waiting. Call it when this rank stops for an error; it does
    nothing outside torchrun, nor where the store does not answer within ``timeout`` (it went
    with its node: the waiting ranks fail on that already)."""
    with contextlib.suppress(Exception):
        store = connect_agent_store(timeout)
        if store is not None:
            store.set(f"{_barrier_prefix()}/left", os.environ.get("RANK", "?"))


def shutdown_distributed() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(status: int = 0) -> None:
    """End a finished rank of a multi-process CPU (gloo) run now, skipping interpreter teardown:
    gloo's threads can abort the process there ("terminate called without an active
    exception"), after all the work is done, and torchrun would report the run as failed. Call
    it once the run's files are written and closed; it returns (and does nothing) in a single
    process or on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
