"""The best-checkpoint settings (novelkit/training/best_checkpoint.py); the behaviour end to end (the best evaluation's
adapter is the output, early stopping, resume) is tested on the LoRA recipe in test_lora_recipe.py."""

import pytest
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

from novelkit.errors import ConfigError
from novelkit.training.best_checkpoint import EarlyStopping, best_metric_name, keep_best_checkpoint

SFT = ("loss", "rouge-1", "rouge-2", "rouge-l", "ner_f1")


def test_metric_choice():
    assert best_metric_name("auto", SFT, generation_eval=True) == "rouge-l"
    assert best_metric_name("auto", SFT, generation_eval=False) == "loss"
    assert best_metric_name("last", SFT) == ""
    with pytest.raises(ConfigError, match="not one of: auto, last, loss"):
        best_metric_name("bleu", SFT, generation_eval=True)
    with pytest.raises(ConfigError, match="needs generated samples"):
        best_metric_name("rouge-1", SFT, generation_eval=False)


def targs(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=10, save_strategy="steps",
                             report_to="none", use_cpu=True, **kw)


def test_keep_best_sets_the_trainer_up_and_refuses_saves_off_the_evaluations(tmp_path, capsys):
    args = targs(tmp_path, save_steps=10)
    [callback] = keep_best_checkpoint(args, "rouge-l", patience=4)
    assert isinstance(callback, EarlyStopping) and isinstance(callback, EarlyStoppingCallback)
    assert callback.early_stopping_patience == 4
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_rouge-l" and args.greater_is_better
    loss = targs(tmp_path, save_steps=10)
    assert keep_best_checkpoint(loss, "loss", patience=0) == [] and loss.load_best_model_at_end
    assert not loss.greater_is_better

    off = targs(tmp_path, save_steps=15)
    with pytest.raises(ConfigError, match="needs a save at every evaluation"):
        keep_best_checkpoint(off, "loss", patience=3, asked=True)
    assert keep_best_checkpoint(off, "loss", patience=3) == [] and not off.load_best_model_at_end
    assert "the output is the last step's model" in capsys.readouterr().out
    assert keep_best_checkpoint(targs(tmp_path, save_steps=10), "", patience=3) == []  # --best_metric last


def test_a_score_still_at_zero_does_not_use_up_the_patience(tmp_path):
    """ROUGE stays 0 until a model (one trained from scratch, early on) writes anything that overlaps: those
    evaluations do not count; once there is a best above 0, evaluations that do not beat it do, zeros included."""
    args = targs(tmp_path, save_steps=10)
    [stop] = keep_best_checkpoint(args, "rouge-l", patience=2)
    state, control = TrainerState(), TrainerControl()

    def evaluate(value):
        stop.on_evaluate(args, state, control, {"eval_rouge-l": value})
        if state.best_metric is None or value > state.best_metric:  # what the Trainer does after the callbacks
            state.best_metric = value
        return control.should_training_stop

    assert not any(evaluate(0.0) for _ in range(5))  # five flat zeros: training goes on
    assert not evaluate(0.1) and not evaluate(0.05)
    assert evaluate(0.0)  # the second evaluation without a better value than 0.1
