"""Experiment trackers that mirror metrics.jsonl: Weights & Biases and MLflow (optional extras).

Each is opened on rank 0 only, when its keys are set, and gets every metrics line as it is
written. Both work offline: wandb with WANDB_MODE=offline, MLflow with a file-store URI.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from mt_core.config import ConfigError, TrainingArgs, args_to_dict

__all__ = ["Tracker", "open_trackers"]


class Tracker(Protocol):
    def log(self, record: dict[str, Any], step: int) -> None: ...
    def finish(self) -> None: ...


class _Wandb:
    def __init__(self, args: TrainingArgs) -> None:
        wandb = _import("wandb", "wandb")
        self.run = wandb.init(
            project=args.wandb_project,
            name=args.wandb_run_name,
            entity=args.wandb_entity,
            config=args_to_dict(args),
            dir=args.output_dir,
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(record, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, args: TrainingArgs) -> None:
        uri = args.mlflow_tracking_uri
        if uri and (uri.startswith("file:") or "://" not in uri):
            # The file store is what works offline; newer MLflow asks for this opt-in to use it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = _import("mlflow", "mlflow")
        if uri:
            mlflow.set_tracking_uri(uri)
        if args.mlflow_experiment_name:
            mlflow.set_experiment(args.mlflow_experiment_name)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=args.mlflow_run_name)
        params = {k: v for k, v in args_to_dict(args).items() if v is not None}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, record: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        self.mlflow.log_metrics(numbers, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


def _import(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as error:
        raise ConfigError(
            [f"{module} is not installed: pip install 'mt-core[{extra}]' (or pip install {module})"]
        ) from error


def open_trackers(args: TrainingArgs) -> list[Tracker]:
    """The trackers the run file asks for (call on rank 0 only)."""
    trackers: list[Tracker] = []
    if args.wandb_project:
        trackers.append(_Wandb(args))
    if args.mlflow_tracking_uri or args.mlflow_experiment_name:
        trackers.append(_Mlflow(args))
    return trackers
