"""What the person running a search reads: one line per trial epoch and one per finished trial."""

from __future__ import annotations

from ray.tune import Callback

from drtune.evaluation import METRIC_NAMES


class Progress(Callback):
    """The driver's output: one line per trial epoch (rank 0's all-reduced metrics, wherever the
    workers run) and one per finished trial (what the user, and the resume test, watch for)."""

    def __init__(self, max_epochs: int, metric: str = "top1") -> None:
        self.max_epochs = max_epochs
        self.key, self.name = f"val_{metric}", METRIC_NAMES[metric]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "resumed_from_epoch" in result:
            print(
                f"trial {trial.trial_id} continued from its epoch-{int(result['resumed_from_epoch'])} checkpoint",
                flush=True,
            )
        if result.get("diverged"):
            return
        print(
            f"trial {trial.trial_id} epoch {result.get('epoch')}/{self.max_epochs}: val {self.name} "
            f"{result.get(self.key, float('nan')):.4f}, val loss {result.get('val_loss', float('nan')):.4f}, train CE "
            f"{result.get('train_ce', float('nan')):.4f} + reg {result.get('train_reg', float('nan')):.4f}, "
            f"{result.get('epoch_s', float('nan')):.1f} s, {result.get('images_per_s', float('nan')):.0f} images/s",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result or {}
        if r.get("diverged"):
            print(
                f"trial {trial.trial_id} diverged in epoch {r.get('epoch')} ({r.get('error')}); not retried", flush=True
            )
            return
        how = "completed" if r.get("epoch", 0) >= self.max_epochs else "stopped by ASHA"
        print(
            f"trial {trial.trial_id} {how} after {r.get('epoch')} epochs: val {self.name} "
            f"{r.get(self.key, float('nan')):.4f}",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"trial {trial.trial_id} failed (its error is in the trial's MLflow run); the search goes on", flush=True)
