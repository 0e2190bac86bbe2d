"""The processes of a test's run, forked from one that has imported mt already.

A fresh interpreter spends about 5 s of CPU importing torch, transformers and mt before a tiny
run's first step; a suite that starts a hundred ranks pays that a hundred times on a 2-core CI
machine. Here a multiprocessing fork server imports mt once (per pytest worker), and each rank is
a fork of it: a 2-rank run costs its training and little more.

The ranks see torchrun's contract, as mt reads it: RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE and
TORCHELASTIC_RESTART_COUNT, with the key-value store held by the launching process, as torchrun's
agent holds it. As torchrun does, the first rank to fail ends the others: SIGTERM, then SIGKILL
after a grace period. One process (``nproc=1``) gets no torchrun variables, as `mt run` alone.
What libraries read from the environment when they are imported (the fork server did that) keeps
its values; the import path follows the given PYTHONPATH, and TMPDIR is read anew.

Tests whose subject is torchrun itself (its agent's signals, several nodes, `mt`'s launcher)
start the real one. This file is also the ranks' entry: the fork server runs it by path, with
``__name__ == "__rank__"`` (tests/ is not a package the fork server could import).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what every run imports: the fork server loads it once, each rank inherits it
PRELOAD = ["mt.cli", "mt_core.trainer.loop"]
GRACE_S = 30  # torchrun's wait between SIGTERM and SIGKILL for the ranks left


def launch_forked(
    arguments: list[str], *, nproc: int, env: dict[str, str], script: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:  # fmt: skip
    """``mt ARGUMENTS`` (or ``python SCRIPT ARGUMENTS``) on ``nproc`` forked ranks with the
    environment ``env``: their stdout and stderr (rank after rank) and the run's status, as
    torchrun reports it (0, or the first failed rank's: its exit code, or minus its signal)."""
    import torch.distributed as dist

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    store = None
    if nproc > 1:  # torchrun's agent store: held here, so it outlives the ranks as there
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="mt-ranks-") as logs:
        ranks = []
        for rank in range(nproc):
            rank_env = dict(env)
            if store is not None:
                rank_env.update(
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                    LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                    TORCHELASTIC_RESTART_COUNT="0",
                )  # fmt: skip
            entry = {"arguments": arguments, "script": script and str(script), "env": rank_env,
                     "logs": f"{logs}/{rank}"}  # fmt: skip
            process = context.Process(
                target=runpy.run_path, args=(__file__,),
                kwargs={"init_globals": {"ENTRY": entry}, "run_name": "__rank__"},
            )  # fmt: skip
            process.start()
            ranks.append(process)
        status = _wait(ranks, time.monotonic() + timeout)
        stdout, stderr = ("".join(_read(Path(f"{logs}/{rank}.{stream}")) for rank in range(nproc))
                          for stream in ("out", "err"))  # fmt: skip
    if status is None:
        raise subprocess.TimeoutExpired(arguments, timeout, stdout, stderr)
    return subprocess.CompletedProcess(arguments, status, stdout, stderr)


def _read(log: Path) -> str:
    """A rank's output (nothing where it died before it opened its files)."""
    return log.read_text(errors="replace") if log.is_file() else ""


def _wait(ranks: list, deadline: float) -> int | None:
    """The run's status once every rank ended (None: past ``deadline``, all killed)."""
    failed = None
    while any(process.is_alive() for process in ranks):
        if time.monotonic() > deadline:
            _end(ranks, grace_s=0)
            return None
        for process in ranks:
            if failed is None and process.exitcode not in (None, 0):
                failed = process.exitcode
                _end(ranks, grace_s=GRACE_S)
        time.sleep(0.05)
    if failed is None:
        failed = next((p.exitcode for p in ranks if p.exitcode != 0), 0)
    return failed


def _end(ranks: list, grace_s: float) -> None:
    for process in ranks:
        if process.is_alive():
            process.terminate() if grace_s else process.kill()
    stop = time.monotonic() + grace_s
    for process in ranks:
        process.join(max(0.0, stop - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _run_rank(arguments: list[str], script: str | None, env: dict[str, str], logs: str) -> None:
    """One rank, in a fresh fork: its output to files, then `mt` or the script, as a new
    process of this environment would run them."""
    for stream, fd in (("out", 1), ("err", 2)):
        os.dup2(os.open(f"{logs}.{stream}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR as this run's environment says
    # the import path a new interpreter would start with: the script's folder, then PYTHONPATH
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [str(Path(script).parent), *paths] if script else paths

    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count())))
    if script is None:
        from mt.cli import main

        sys.argv = ["mt", *arguments]
        main(arguments)
    else:
        sys.argv = [script, *arguments]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__rank__":
    _run_rank(**ENTRY)  # noqa: F821 (given by launch_forked)
