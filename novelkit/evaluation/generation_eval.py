"""Evaluation during training: eval loss, plus ROUGE (and entity F1 for NER) of responses generated for a dev sample.

The seeds gave up on ROUGE during training because `compute_metrics` makes the Trainer gather every eval batch's
[batch, seq, vocab] logits (gigabytes for a 125k vocabulary). Here the Trainer computes only the loss (no
compute_metrics, so it keeps no logits), and the text metrics come from generating for a fixed sample of the dev set
one batch at a time: memory holds one batch, whatever the size of the dev set.
"""

from __future__ import annotations

import random

from transformers import Trainer

from ..generation.batch import generate_responses, generation_kwargs
from .prediction import score_responses


class GenerationEvaluator:
    """Generates greedily for `count` dev samples (a fixed random pick) and scores them against their responses."""

    def __init__(self, tokenizer, template, samples, *, count: int = 16, max_new_tokens: int = 128,
                 batch_size: int = 8, seed: int = 0):
        samples = [s for s in samples if s.response.strip()]
        picked = sorted(random.Random(seed).sample(range(len(samples)), min(count, len(samples))))
        self.samples = [samples[i] for i in picked]
        self.tokenizer, self.template = tokenizer, template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, model) -> dict[str, float]:
        gen = generation_kwargs(model, max_new_tokens=self.max_new_tokens, do_sample=False)
        responses = generate_responses(model, self.tokenizer, self.template, self.samples,
                                       batch_size=self.batch_size, progress=False, in_training=True, **gen)
        scores = score_responses(responses, [s.response for s in self.samples])
        headline = {name: stats["f"] for name, stats in scores["rouge-chinese/word"].items()}
        if "ner" in scores:
            headline["ner_f1"] = scores["ner"]["f1"]
        return headline


class GenerationEvalTrainer(Trainer):
    """A Trainer whose evaluation of its dev set also has the evaluator's metrics, beside the loss: logged together
    (TensorBoard, trainer_state.json, console) and seen by the callbacks and the best-checkpoint choice."""

    def __init__(self, *args, evaluator: GenerationEvaluator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluator = evaluator
        self._generating = False

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        self._generating = eval_dataset is None  # the dev set's own evaluation, not a set passed in
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._generating = False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # here, not after evaluate(): evaluate() hands its metrics to the callbacks (early stopping) before returning
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._generating and self.evaluator is not None and self.evaluator.samples:
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.evaluator(self.model).items()})
        return output
