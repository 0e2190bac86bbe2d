"""Trainer callbacks: user code called at fixed points of the loop, in every process.

Callbacks are named by import path in the run file (``callbacks = ["pkg.mod:MyCallback"]``) and
built in each torchrun process, so nothing is pickled or sent between processes. Each callback
runs on a thread of its own and is fed its hooks in order through a queue: a slow callback
lags behind but never stalls a step, and one that raises is reported once per hook name, then
ignored for that hook, while training goes on.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from typing import Any

from mt_core.config import ConfigError

__all__ = ["HOOKS", "CallbackRunner", "TrainerCallback", "load_callbacks"]

logger = logging.getLogger("mt_core")

HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_step_end",
    "on_before_forward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_after_optimizer_step",
    "on_log",
    "on_evaluate",
    "on_save",
)


class TrainerCallback:
    """Override the hooks you need; each gets keyword arguments: always ``step`` (steps done so
    far), ``epoch``, ``rank``, ``world_size`` and ``time`` (``time.perf_counter()`` when the
    hook fired: hooks run later, on the callback's own thread); ``on_log`` also ``record`` (the metrics line),
    ``on_evaluate`` ``val_loss``, ``on_save`` ``path`` (an HF export or a checkpoint)."""

    def on_train_begin(self, **info: Any) -> None: ...
    def on_train_end(self, **info: Any) -> None: ...
    def on_epoch_begin(self, **info: Any) -> None: ...
    def on_epoch_end(self, **info: Any) -> None: ...
    def on_step_begin(self, **info: Any) -> None: ...
    def on_step_end(self, **info: Any) -> None: ...
    def on_before_forward(self, **info: Any) -> None: ...
    def on_after_backward(self, **info: Any) -> None: ...
    def on_before_optimizer_step(self, **info: Any) -> None: ...
    def on_after_optimizer_step(self, **info: Any) -> None: ...
    def on_log(self, **info: Any) -> None: ...
    def on_evaluate(self, **info: Any) -> None: ...
    def on_save(self, **info: Any) -> None: ...


def load_callbacks(paths: list[str]) -> list[TrainerCallback]:
    """Import and build each ``"module:Name"``; a bad path is a config error naming it."""
    built = []
    for path in paths:
        module_name, _, attribute = path.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
            built.append(target() if isinstance(target, type) else target)
        except Exception as error:  # ImportError, AttributeError, the constructor's own
            raise ConfigError(
                [f"callbacks: cannot load {path!r} ({type(error).__name__}: {error})"]
            ) from error
    return built


class _Worker:
    """One callback, its queue and its thread."""

    def __init__(self, callback: TrainerCallback) -> None:
        self.callback = callback
        self.queue: queue.Queue = queue.Queue()
        self.failed: set[str] = set()
        self.thread = threading.Thread(
            target=self._serve, daemon=True, name=f"callback-{callback!r}"
        )
        self.thread.start()

    def _serve(self) -> None:
        while (item := self.queue.get()) is not None:
            hook, info = item
            if hook in self.failed:
                continue
            try:
                getattr(self.callback, hook)(**info)
            except Exception as error:
                self.failed.add(hook)
                logger.error(
                    "callback %s failed in %s (%s: %s); this hook of it is skipped from now on",
                    type(self.callback).__name__, hook, type(error).__name__, error,
                )  # fmt: skip


class CallbackRunner:
    """Delivers hooks to every callback without waiting for any of them."""

    def __init__(self, callbacks: list[TrainerCallback], rank: int, world_size: int) -> None:
        self.workers = [_Worker(callback) for callback in callbacks]
        self.common = {"rank": rank, "world_size": world_size}

    def __call__(self, hook: str, **info: Any) -> None:
        if not self.workers:
            return
        # the moment the hook fired: a callback runs later, on its own thread
        fired = {**self.common, "time": time.perf_counter(), **info}
        for worker in self.workers:
            worker.queue.put((hook, fired))

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the callbacks finish their queued hooks (up to ``timeout_s`` each)."""
        for worker in self.workers:
            worker.queue.put(None)
        for worker in self.workers:
            worker.thread.join(timeout_s)
            if worker.thread.is_alive():
                logger.error("callback %s still busy after %.0f s; not waited for",
                             type(worker.callback).__name__, timeout_s)  # fmt: skip
