"""Run configuration, model set-up, loss, optimizer and the train loop of mt.

``from mt_core import TrainingArgs, PretrainingConfig, train``: the Python API mirrors the run
file. ``train`` is imported on first use, so reading or validating a config stays light.
"""

import logging
from typing import TYPE_CHECKING, Any

from mt_core.config import (
    ConfigError,
    PretrainingConfig,
    TrainingArgs,
    args_from_dict,
    args_to_dict,
    load_run_file,
    write_run_file,
)
from mt_core.errors import NonFiniteError, RunError
from mt_core.launch import TorchrunArgs, TrainingFailed, run_training
from mt_core.trainer.callbacks import TrainerCallback

# torchao (installed with the torchao extra, and then imported by transformers in every process)
# registers Enums with torch's pytree, which this torch supports natively and warns about once
# per process and rank: nothing for a user to act on, so that one message is dropped.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage()
)

if TYPE_CHECKING:
    from mt_core.trainer.loop import TrainResult, train

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "PretrainingConfig",
    "RunError",
    "TorchrunArgs",
    "TrainerCallback",
    "TrainResult",
    "TrainingArgs",
    "TrainingFailed",
    "args_from_dict",
    "args_to_dict",
    "load_run_file",
    "run_training",
    "train",
    "write_run_file",
]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from mt_core.trainer import (
            loop as trainer,  # torch, transformers: imported only when training
        )

        return getattr(trainer, name)
    raise AttributeError(f"module 'mt_core' has no attribute {name!r}")
