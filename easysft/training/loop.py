"""``train(...)``: set-up, then one readable loop (step, log, eval, save), then the final save.

Read it top to bottom; each feature is an explicit line behind a flag, there are no callbacks. The pieces:
``setup`` (easysft/training/run.py) builds the :class:`Run`; ``train_step`` (easysft/training/step.py) does one
optimizer step; ``save_state`` writes a resumable checkpoint; ``run_eval`` measures the eval split.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from easysft import checkpoint
from easysft.config import DataConfig, GenerateConfig, LoraConfig, ModelConfig, TrainConfig
from easysft.distributed import barrier, print0
from easysft.dtypes import autocast_dtype
from easysft.errors import EasySFTError, TrainingError
from easysft.evaluation import evaluate
from easysft.files import disk_full_reason
from easysft.metrics import plot_losses
from easysft.models.save import save_model_folder
from easysft.testing_hooks import maybe_fail
from easysft.training import signals
from easysft.training.eval_extras import measure_extras
from easysft.training.memory_check import out_of_memory_at
from easysft.training.run import Run, TrainResult, output_lock, setup
from easysft.training.selection import after_eval, load_best_weights
from easysft.training.status import RunStatus
from easysft.training.step import StepRecord, train_step

__all__ = ["TrainResult", "train"]


def train(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, lora_cfg: LoraConfig | None = None,
          gen_cfg: GenerateConfig | None = None) -> TrainResult:
    """Fine-tune ``model_cfg``'s model on ``data_cfg``'s data; write the model and logs to ``output_dir``."""
    with output_lock(train_cfg):  # a second run into the same output_dir fails at once (training/run.py)
        try:
            run = setup(model_cfg, data_cfg, train_cfg, lora_cfg or LoraConfig(), gen_cfg or GenerateConfig())
        except Exception as exc:  # a full disk while writing the run's first files (config, data report)
            why = disk_full_reason(exc)
            if why is None or isinstance(exc, EasySFTError):
                raise
            raise TrainingError(f"cannot write into {train_cfg.output_dir} ({why}); nothing was trained: free "
                                "space (or give another --output_dir), then rerun.") from None
        status = RunStatus(run.output_dir, enabled=run.dist.is_main)  # run_status.json, read by the dashboard
        status.write("running")
        try:
            try:
                result = _train_loop(run, train_cfg)
            except Exception as exc:  # a full disk in any write (metrics, checkpoint, model): one line, exit 6
                why = disk_full_reason(exc)
                if why is None or isinstance(exc, TrainingError):
                    raise
                raise _disk_full_error(run, why) from None
        except BaseException as exc:
            status.stopped(exc)
            raise
        status.write("finished")
        return result


def _train_loop(run: Run, train_cfg: TrainConfig) -> TrainResult:
    """Evals, steps, checkpoints and the final save of a set-up run (see :func:`train`)."""
    from tqdm import tqdm

    cfg, pos, gas = run.train_cfg, run.position, train_cfg.gradient_accumulation_steps
    if run.resumed_from is None:
        run_eval(run, 0, 0.0)
    else:  # last: nothing may draw random numbers between the RNG restore and the loop
        checkpoint.restore_rng(run.resumed_from, run.dist)
    stopper = signals.StopSignals(run.hooks)  # SIGTERM/SIGINT: finish the step, checkpoint, exit (signals.py)
    progress = tqdm(total=run.total_steps, initial=pos.step, disable=not run.dist.is_main, dynamic_ncols=True,
                    desc="train")
    started, epoch_progress = time.perf_counter(), float(pos.epoch)
    try:
        while pos.step < run.total_steps:
            plan = run.epoch_plan(pos.epoch)
            for first in range(pos.next_micro_batch, len(plan.batches), gas):
                if pos.step >= run.total_steps:
                    break
                try:
                    record = train_step(run, plan.batches[first : first + gas], pos.step + 1)
                except torch.OutOfMemoryError:  # one line naming the step, rows and levers; checkpoints intact
                    progress.close()
                    raise out_of_memory_at(run, plan.batches[first : first + gas], pos.step + 1) from None
                pos.step, pos.next_micro_batch = pos.step + 1, first + gas
                maybe_fail(run.hooks, pos.step, run.dist.rank)  # testing hook (EASYSFT_FAIL_AT_STEP)
                epoch_progress = pos.epoch + min(1.0, (first + gas) / len(plan.batches))
                pos.nonfinite_in_a_row = 0 if record.finite else pos.nonfinite_in_a_row + 1
                if not record.finite:
                    _skip_nonfinite(run, record, progress)
                _log_step(run, record, epoch_progress, progress)
                if cfg.eval_steps and pos.step % cfg.eval_steps == 0:
                    run_eval(run, pos.step, epoch_progress)
                stop_reason = stopper.should_stop(pos.step)
                if stop_reason:
                    saved = save_state(run, "preempted")
                    progress.close()
                    raise signals.Preempted(signals.stopped_message(stop_reason, pos.step, saved))
                if cfg.save_steps and pos.step % cfg.save_steps == 0:
                    save_state(run, "save_steps")
            pos.epoch, pos.next_micro_batch = pos.epoch + 1, 0
            history = run.result.eval_history
            if pos.step < run.total_steps and history and history[-1]["step"] != pos.step:
                run_eval(run, pos.step, float(pos.epoch))  # end of a full epoch
        if not run.result.eval_history or run.result.eval_history[-1]["step"] != pos.step:
            run_eval(run, pos.step, epoch_progress)
    except BaseException:
        progress.close()  # before the error line, so the bar is not redrawn after it
        raise
    progress.close()
    stopper.restore()
    run.result.steps = pos.step
    print0(f"trained {pos.step} steps in {time.perf_counter() - started:.1f}s")
    save_final_model(run)
    return run.result


def _log_step(run: Run, record: StepRecord, epoch_progress: float, progress) -> None:
    step = run.position.step
    seconds = max(record.seconds, 1e-9)
    run.metrics.log({"step": step, "epoch": round(epoch_progress, 4), "loss": record.loss, "lr": record.lr,
                     "grad_norm": record.grad_norm, "num_tokens": record.num_tokens,
                     "total_tokens": record.total_tokens, "tokens_per_s": record.total_tokens / seconds,
                     "supervised_tokens_per_s": record.num_tokens / seconds})
    run.result.losses.append(record.loss)
    progress.update(1)
    progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}",
                         tok_s=f"{record.total_tokens / seconds:.0f}")
    if run.train_cfg.print_loss:
        print0(f"epoch {run.position.epoch} step {step}: loss {record.loss:.6f}")


def _skip_nonfinite(run: Run, record: StepRecord, progress) -> None:
    """The engine already skipped the update; log it, and stop after ``--max_nonfinite_steps`` in a row."""
    pos = run.position
    run.metrics.log({"step": pos.step, "event": "nonfinite_step_skipped", "loss": record.loss,
                     "grad_norm": record.grad_norm})
    print0(f"step {pos.step}: non-finite loss/grad norm ({record.loss}, {record.grad_norm}); update skipped")
    if pos.nonfinite_in_a_row >= run.train_cfg.max_nonfinite_steps:
        # Skipped steps left the weights untouched: this checkpoint IS the last good state.
        saved = save_state(run, "nonfinite")
        progress.close()  # before the error line, so the bar is not redrawn after it
        raise TrainingError(
            f"{pos.nonfinite_in_a_row} non-finite steps in a row (last at step {pos.step}); lower --learning_rate, "
            f"use --dtype fp32, or check the data. Last good state saved in {saved}."
        )


def save_state(run: Run, reason: str) -> Path:
    """A resumable checkpoint of the current position (a collective: every rank calls it)."""
    pos = run.position
    state = checkpoint.TrainerState(pos.step, pos.epoch, pos.next_micro_batch, pos.nonfinite_in_a_row, reason=reason)
    return checkpoint.save(run.output_dir, run.engine, state, run.run_config, run.dist,
                           run.train_cfg.save_total_limit, hooks=run.hooks,
                           protect=run.selection.best_path if run.selection else None)  # the best is kept


def run_eval(run: Run, step: int, epoch: float) -> None:
    """Perplexity on the eval split (reduced over ranks), plus generation scores and the probe when asked;
    logged, kept in the result's eval history, then the best-model and early-stopping bookkeeping."""
    if not run.data.eval:
        return
    ev = evaluate(run.engine.model, run.data.eval, batch_size=run.train_cfg.per_device_eval_batch_size,
                  pad_token_id=run.tokenizer.pad_token_id, rank=run.dist.rank, world_size=run.dist.world_size,
                  device=run.dist.device, autocast_dtype=autocast_dtype(run.train_cfg.dtype))
    record = {"step": step, "epoch": round(epoch, 4), "eval_loss": ev.loss, "eval_ppl": ev.perplexity,
              "eval_num_tokens": ev.num_tokens} | measure_extras(run, step)  # --eval_generate, --probe_data
    run.metrics.log(record)
    run.result.eval_history.append(record)
    run.result.final_eval = ev
    print0(f"eval step {step}: loss {ev.loss:.4f} ppl {ev.perplexity:.3f} ({ev.num_tokens} tokens)")
    after_eval(run, record, save_state)  # best model (--load_best_model_at_end), early stopping


def save_final_model(run: Run) -> None:
    """Gathering shards is a collective every rank joins; only rank 0 writes the model folder and the plot."""
    load_best_weights(run)  # --load_best_model_at_end (a collective for sharded engines)
    state_dict = run.engine.full_state_dict()
    if run.dist.is_main:
        try:
            save_model_folder(run.engine.unwrapped_model(), run.tokenizer, run.output_dir, meta=run.model_meta(),
                              state_dict=state_dict if getattr(run.engine, "gathers_state_dict", False) else None,
                              # base weights trained too: the adapter alone would not be the model, save merged
                              merge_lora=run.lora_cfg.enabled and not run.lora_cfg.only_optimize_lora)
        except Exception as exc:  # noqa: BLE001 -- a full disk raises OSError, SafetensorError, RuntimeError...
            why = disk_full_reason(exc) or (exc.strerror if isinstance(exc, OSError) else None)
            if why is None and not isinstance(exc, OSError):
                raise
            # Keep the finished training if at all possible
            raise _final_save_failed(run, why or str(exc)) from None
        run.metrics.close()
        plot_losses(Path(run.output_dir) / "metrics.jsonl", Path(run.output_dir) / "loss.png")
        print0(f"saved the model to {run.output_dir}")
    barrier()


def _disk_full_error(run: Run, why: str) -> TrainingError:
    """The one line for a write that met a full disk during training; names the last complete checkpoint."""
    done = [p for _, p, complete in checkpoint.list_checkpoints(run.output_dir) if complete]
    keep = (f"the last complete checkpoint {done[-1]} is kept: free space, then rerun the same command with "
            "--resume" if done else "no checkpoint was saved yet: free space, then rerun")
    return TrainingError(f"cannot write into {run.output_dir} at step {run.position.step} ({why}); {keep}.")


def _final_save_failed(run: Run, why: str) -> TrainingError:
    """The error for a final save that failed (its temporary folder is already gone). Single process: try a
    resumable checkpoint of the finished run, so `--resume` writes the model later without training again."""
    saved = None
    if run.dist.world_size == 1:
        try:
            saved = save_state(run, "final_save_failed")
        except Exception:  # noqa: BLE001 -- the same full disk usually; the message says what is left
            saved = None
    if saved is not None:
        return TrainingError(f"cannot write the model into {run.output_dir} ({why}); the finished run is saved in "
                             f"{saved}: free space, then rerun the same command with --resume to write the model.")
    return TrainingError(f"cannot write the model into {run.output_dir} ({why}) and no checkpoint could be saved; "
                         "free space, then rerun with --overwrite_output_dir (or --resume from --save_steps "
                         "checkpoints).")
