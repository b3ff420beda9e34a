"""Best model and early stopping over the eval records (``--metric_for_best_model``, ``--load_best_model_at_end``,
``--early_stopping_patience``, ``--early_stopping_threshold``).

The state (best value and step, evals without improvement) is a pure function of the eval records, so a resumed
run rebuilds it from metrics.jsonl (cut back to the checkpoint's step): the best-so-far survives a resume with no
extra file. With ``--load_best_model_at_end`` every new best eval writes a checkpoint (reason ``best``), which
retention (``--save_total_limit``) never deletes while it is the best; the final save loads it back first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from easysft.checkpoint.layout import is_complete, step_dir
from easysft.distributed import print0
from easysft.scoring import greater_is_better, is_improvement


@dataclass
class Selection:
    metric: str
    greater: bool
    threshold: float = 0.0
    patience: int | None = None
    keep_best: bool = False
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    best_path: Path | None = None

    @classmethod
    def from_config(cls, train_cfg) -> Selection | None:
        if not train_cfg.metric_for_best_model:
            return None
        greater = train_cfg.greater_is_better
        if greater is None:
            greater = greater_is_better(train_cfg.metric_for_best_model)
        return cls(train_cfg.metric_for_best_model, greater, train_cfg.early_stopping_threshold,
                   train_cfg.early_stopping_patience, train_cfg.load_best_model_at_end)

    def update(self, record: dict) -> bool:
        """Take one eval record; True when it is the new best."""
        value = record.get(self.metric)
        if is_improvement(value, self.best_value, greater=self.greater, threshold=self.threshold):
            self.best_value, self.best_step, self.evals_without_improvement = float(value), record["step"], 0
            return True
        self.evals_without_improvement += 1
        return False

    def replay(self, eval_history: list[dict], output_dir) -> None:
        """Rebuild the state from a resumed run's eval records; find the best eval's checkpoint."""
        for record in eval_history:
            self.update(record)
        if self.keep_best and self.best_step is not None and is_complete(step_dir(output_dir, self.best_step)):
            self.best_path = step_dir(output_dir, self.best_step)

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_without_improvement >= self.patience

    def meta(self) -> dict:
        """What easysft.json records about the selection."""
        return {"metric": self.metric, "greater_is_better": self.greater, "best_step": self.best_step,
                "best_value": self.best_value}


def after_eval(run, record: dict, save_state: Callable) -> None:
    """Track the best eval (and checkpoint it with --load_best_model_at_end); end training when patience is spent:
    ``run.total_steps`` becomes this step, so the loop leaves, and a checkpoint is written now."""
    selection: Selection | None = run.selection
    if selection is None:
        return
    if selection.update(record) and selection.keep_best:
        selection.best_path = save_state(run, "best")
    step = record["step"]
    if selection.should_stop and step < run.total_steps:
        run.total_steps = step
        save_state(run, "early_stopping")
        print0(f"early stopping at step {step}: {selection.metric} did not improve by more than "
               f"{selection.threshold:g} for {selection.evals_without_improvement} evals (best "
               f"{selection.best_value:.6g} at step {selection.best_step})")


def load_best_weights(run) -> None:
    """--load_best_model_at_end: put the best eval's weights back into the engine before the final save."""
    selection: Selection | None = run.selection
    if selection is None or not selection.keep_best or selection.best_step in (None, run.position.step):
        return
    if selection.best_path is None:
        print0(f"warning: no checkpoint of the best eval (step {selection.best_step}); keeping the last weights")
        return
    run.engine.load_checkpoint(selection.best_path)
    print0(f"loaded the best model (step {selection.best_step}, {selection.metric} {selection.best_value:.6g}) "
           f"from {selection.best_path}")
