"""Code run around a decoder block's whole call: its checkpoint, compiled graph and FSDP2's hooks
inside, Python outside them.

A compiled block's ``__call__`` leads straight into the compiled code, so what must run eagerly
at every call (mark sizes dynamic before the compiler sees them; put saved tensors under hooks)
goes around it. The block's class is swapped for a subclass whose ``__call__`` runs the block's
own call through each function installed with :func:`call_around`, the first installed
outermost; installing again under the same name replaces that one in its place. One subclass
per block class, of the same name: a compiled block's graph is reused by every block of one
class, and what finds blocks by class name (HF's ``_no_split_modules``) still finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

__all__ = ["call_around"]

# around(call, *args, **kwargs) -> what call(*args, **kwargs) returns, having run it
Around = Callable[..., Any]


class _CalledAround:
    _arounds: dict[str, Around]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = super().__call__
        for around in reversed(self._arounds.values()):  # the first installed ends up outermost
            call = partial(around, call)
        return call(*args, **kwargs)


_CLASSES: dict[type, type] = {}


def call_around(block: nn.Module, name: str, around: Around) -> None:
    """From now on, ``block(*args, **kwargs)`` runs ``around(call, *args, **kwargs)``, where
    ``call`` is the block's call with what was installed before inside it; ``name`` says what it
    is (a second install under a name replaces the first)."""
    cls = type(block)
    if not issubclass(cls, _CalledAround):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(cls.__name__, (_CalledAround, cls), {"__module__": cls.__module__})
        block.__class__ = _CLASSES[cls]
        block._arounds = {}
    block._arounds[name] = around
