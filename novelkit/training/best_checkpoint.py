"""The best model, not the last: the recipes save a checkpoint at every evaluation, the Trainer remembers the best one
by one eval metric and loads it when training ends (so the recipe's final save writes it), and training stops after
`patience` evaluations without a better value. All of it is transformers' own machinery (`load_best_model_at_end`,
`EarlyStoppingCallback`); a rerun after a kill resumes with the best so far and the patience count, both kept in
trainer_state.json. At the end one line (and <output_dir>/best_checkpoint.json) says which step won and why."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from ..errors import ConfigError
from ..outputs import write_json_atomic


@dataclass
class BestCheckpointArguments:
    best_metric: str = field(default="auto", metadata={"help": "the checkpoint kept as the output: loss (the dev "
                                                               "loss), rouge-1/rouge-2/rouge-l (dev ROUGE F of the "
                                                               "generated samples), ner_f1; auto = "
                                                               "rouge-l where generation-based evaluation runs, else "
                                                               "loss; last = the last step's model"})
    patience: int = field(default=3, metadata={"help": "stop after this many evaluations without a better best_metric; "
                                                      "0 = train to the end"})


def best_metric_name(choice: str, allowed: tuple[str, ...], generation_eval: bool = False) -> str:
    """The eval metric behind a --best_metric choice ("" for last); a one-line error for an unknown one."""
    if choice == "auto":
        return "rouge-l" if generation_eval else "loss"
    if choice == "last":
        return ""
    if choice not in allowed:
        raise ConfigError(f"--best_metric {choice!r} is not one of: auto, last, {', '.join(allowed)}")
    if choice != "loss" and not generation_eval:
        raise ConfigError(f"--best_metric {choice} needs generated samples at each evaluation (EVAL_SAMPLES > 0)")
    return choice


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping, except that an evaluation whose score is still 0 (ROUGE before the model writes
    anything that overlaps: a model trained from scratch, early on) does not count against the patience: a flat
    zero says the model has not started, not that it has stopped improving."""

    def check_metric_value(self, args, state, control, metric_value):
        if args.greater_is_better and metric_value == 0 and not state.best_metric:
            return
        super().check_metric_value(args, state, control, metric_value)


def keep_best_checkpoint(targs, metric: str, patience: int, asked: bool = False) -> list[TrainerCallback]:
    """Sets the TrainingArguments to keep and load the best checkpoint by eval_<metric>; returns the callbacks to give
    the Trainer (early stopping when patience > 0). Nothing when there is no evaluation or metric is "". When the
    saves do not fall on the evaluations (the recipe scripts make them), an explicitly `asked` metric is an error;
    the default keeps the last step's model and says so."""
    if not metric or targs.eval_strategy == IntervalStrategy.NO:
        return []
    same = targs.save_strategy.value == targs.eval_strategy.value and (
        targs.eval_strategy != IntervalStrategy.STEPS or targs.save_steps == targs.eval_steps)
    if not same:
        why = ("keeping the best checkpoint needs a save at every evaluation: --save_strategy/--save_steps equal to "
               "--eval_strategy/--eval_steps (the recipe scripts pass both from EVAL_STEPS)")
        if asked:
            raise ConfigError(f"{why}, or --best_metric last")
        print(f"note: the output is the last step's model: {why}", flush=True)
        return []
    targs.load_best_model_at_end = True
    targs.restore_callback_states_from_checkpoint = True  # the patience count survives a kill
    targs.metric_for_best_model = f"eval_{metric}"
    targs.greater_is_better = metric != "loss"
    return [EarlyStopping(early_stopping_patience=patience)] if patience > 0 else []


def report_best(trainer, tag: str) -> dict | None:
    """After training: one line saying which step's model is the output and why, also written (on the main process)
    to <output_dir>/best_checkpoint.json with every evaluation's value. None when no best checkpoint was kept."""
    args, state = trainer.args, trainer.state
    key = args.metric_for_best_model
    if not args.load_best_model_at_end or not key or state.best_global_step is None:
        return None
    evaluations = [{"step": h["step"], "value": h[key]} for h in state.log_history if key in h]
    stopped = state.global_step < state.max_steps
    patience = next((c.early_stopping_patience for c in trainer.callback_handler.callbacks
                     if isinstance(c, EarlyStoppingCallback)), 0)
    summary = {"metric": key, "greater_is_better": bool(args.greater_is_better), "best_step": state.best_global_step,
               "best_value": state.best_metric, "best_checkpoint": state.best_model_checkpoint,
               "last_step": state.global_step, "max_steps": state.max_steps, "stopped_early": stopped,
               "patience": patience, "evaluations": evaluations}
    last = evaluations[-1]["value"] if evaluations else math.nan
    why = (f"stopped early at step {state.global_step} of {state.max_steps}: {patience} evaluations without a better "
           f"value" if stopped else f"trained to the end (step {state.global_step})")
    print(f"[{tag}] best model: step {state.best_global_step}, {key} {state.best_metric:.4g} "
          f"({'highest' if args.greater_is_better else 'lowest'} of {len(evaluations)} evaluations; the last: "
          f"{last:.4g}); {why}", flush=True)
    if trainer.is_world_process_zero():
        write_json_atomic(Path(args.output_dir) / "best_checkpoint.json", summary)
    return summary
