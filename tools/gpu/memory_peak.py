"""What is alive on the GPU at a run's peak: torch's allocator history, read back to its peak.

Used by tools/gpu/osft_cost.py ``--memory-profile`` (each contestant in its own process):

    record()                 # before mt_core.train: every allocation with its Python stack
    ...train...              # (an out-of-memory error is caught: its moment is the peak)
    text = breakdown(torch.cuda.memory._snapshot())

The history's events are replayed in order (``alloc`` adds a block, ``free_completed`` takes it
away: that is when torch's allocated counter drops, after the streams that used the block are
done), to the moment the allocated bytes were largest; the blocks alive then are summed by where
they were made: the innermost frame in mt's, Liger's, torchao's or transformers' sources
(the code that asked), with the innermost frame of torch beside it (what made the block). The
memory model (mt_core.plan.memory) counts the same things by formula, so the table says which
of its terms is short.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# the sources whose frames name an allocation's site; torch's own frames say how it was made
SITES = ("/mt_", "liger_kernel/", "torchao/", "flash_attn/", "transformers/")
GIB = 2**30


def record(max_entries: int = 2_000_000) -> None:
    """Start keeping every allocation and free, with the Python stack that made it."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def _where(frame: dict) -> str:
    path = frame["filename"]
    for marker in SITES:
        at = path.rfind(marker)
        if at >= 0:
            path = path[at:].lstrip("/")
            break
    else:  # torch's own, or generated code: the folder and file name say enough
        path = "/".join(path.rsplit("/", 2)[-2:])
    return f"{path}:{frame['line']} {frame['name']}"


def _site(frames: list[dict]) -> str:
    """The innermost frame in the sources that asked, and the innermost one overall."""
    inner = _where(frames[0]) if frames else "?"
    for frame in frames:
        if any(marker in frame["filename"] for marker in SITES):
            outer = _where(frame)
            return outer if outer == inner else f"{outer}  <-  {inner}"
    return inner


def breakdown(snapshot: dict, device: int = 0, rows: int = 30) -> str:
    """The blocks alive at the peak of ``snapshot``'s history, summed by site (see the module
    docstring); also the stack of the allocation that reached the peak, and any out-of-memory."""
    events = snapshot["device_traces"][device]
    live: dict[int, dict] = {}
    current = peak = 0
    peak_index = -1
    oom = None
    for index, event in enumerate(events):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_index = current, index
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        elif action == "oom":
            oom = event
    # again up to the peak: what was alive at that moment
    live.clear()
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        entry = by_site[_site(event.get("frames", []))]
        entry[0] += event["size"]
        entry[1] += 1
    lines = [
        f"peak {peak / GIB:.2f} GiB allocated (event {peak_index + 1} of {len(events)}; "
        f"{len(live)} blocks alive)"
    ]
    if oom is not None:
        lines.append(f"out of memory asking for {oom['size'] / GIB:.2f} GiB")
    lines.append("GiB | blocks | made at (innermost frame of the asking code  <-  innermost frame)")
    ranked = sorted(by_site.items(), key=lambda item: -item[1][0])
    for site, (size, count) in ranked[:rows]:
        lines.append(f"{size / GIB:7.3f} | {count:6d} | {site}")
    rest = ranked[rows:]
    if rest:
        lines.append(
            f"{sum(s for _, (s, _) in rest) / GIB:7.3f} | {sum(c for _, (_, c) in rest):6d} "
            f"| {len(rest)} other sites"
        )
    if peak_index >= 0:
        lines.append("the allocation that reached the peak, innermost first:")
        frames = events[peak_index].get("frames", [])
        lines += [f"  {_where(f)}" for f in frames if any(m in f["filename"] for m in SITES)][:12]
    return "\n".join(lines)
