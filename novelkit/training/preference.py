"""Preference tuning (DPO, and SimPO without a reference model) on pairs of responses to the same prompt.

Why our own loss and not TRL's DPOTrainer (trl 1.16, measured 2026-12-02): TRL needs `datasets`, `pandas` and
`pyarrow` (55 MB + 12 MB wheels for the GPU machine, over its 64 MiB carry on their own), formats prompts with the
tokenizer's chat template rather than the templates our SFT recipes trained with (Baichuan's reserved-token turns),
and its padding-free mode is switched off in that release. The loss itself is a few lines; everything around it
(templates, truncation, LoRA/QLoRA/full loading, best checkpoint, resume, DeepSpeed) is the SFT recipes' own.

- DPO (Rafailov et al. 2023): loss = -log σ(β·[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]), the log-probs
  summed over each response's tokens. The reference is the model the run starts from (the SFT model or adapter);
  its log-probs are computed once before training and kept in output_dir/reference_logps.json, so no second model
  sits in memory and a resumed run uses the same numbers (the model has moved on by then).
- SimPO (Meng et al. 2024): loss = -log σ(β·(mean log π(c) - mean log π(r)) - γ), per-token means, no reference.

Logged with the loss (train and eval): rewards/chosen, rewards/rejected, rewards/margins (the preference margin),
rewards/accuracies (share of pairs ranked right), logps/chosen, logps/rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..data.features import IGNORE_INDEX, encode_sft
from .preference_data import PreferencePair
from ..errors import ConfigError
from ..outputs import write_json_atomic
from .best_checkpoint import BestCheckpointArguments

LOSSES = ("dpo", "simpo")
REFERENCE_FILE = "reference_logps.json"


@dataclass
class PreferenceArguments(BestCheckpointArguments):
    model_path: str = field(default="", metadata={"help": "local model folder (the SFT model, or the base of "
                                                          "--adapter); empty = the embedded default"})
    adapter: str = field(default="", metadata={"help": "SFT LoRA adapter to continue (LoRA/QLoRA); empty = a new "
                                                       "adapter on model_path"})
    finetuning: str = field(default="lora", metadata={"help": "lora, full or qlora"})
    data: str = field(default="data_examples/preference/train.jsonl",
                      metadata={"help": "preference pairs: JSONL/JSON ({prompt, chosen, rejected} and the "
                                        "LLaMA-Factory/TRL shapes) or the web demo's ratings.sqlite"})
    dev: str = field(default="", metadata={"help": "dev pairs, same choices; empty = none"})
    by: str = field(default="overall", metadata={"help": "ratings.sqlite: the rater's overall choice or one axis "
                                                         "(逻辑性, 背景知识, 文风)"})
    template: str = field(default="", metadata={"help": "chat template; empty = the model's own"})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt + response"})
    loss: str = field(default="dpo", metadata={"help": "dpo (against the starting model) or simpo (no reference)"})
    beta: float = field(default=0.1, metadata={"help": "DPO: strength of the pull towards the reference (0.1); "
                                                       "SimPO: reward scale (2.0 is the paper's)"})
    simpo_gamma: float = field(default=1.0, metadata={"help": "SimPO: target margin between the rewards"})
    verify_save: bool = field(default=False, metadata={"help": "reload the saved model and check its logits"})

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.finetuning not in ("lora", "full", "qlora"):
            raise ConfigError(f"--finetuning must be lora, full or qlora, not {self.finetuning!r}")
        if self.adapter and self.finetuning == "full":
            raise ConfigError("--adapter continues a LoRA adapter: merge it first (Baichuan-Finetune-Lora/"
                              "merge_lora.py) to fine-tune all weights, or use --finetuning lora")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive, not {self.beta}")


# ---------------------------------------------------------------- data


def encode_pairs(tokenizer, template, pairs: list[PreferencePair], max_length: int, what: str) -> list[dict]:
    """Each pair as two SFT encodings of the same prompt (prompt tokens -100, response + end learned)."""
    rows, truncated = [], 0
    for pair in pairs:
        chosen = encode_sft(tokenizer, template, pair.sample, max_length)
        rejected = encode_sft(tokenizer, template, replace(pair.sample, response=pair.rejected), max_length)
        truncated += chosen.truncated or rejected.truncated
        rows.append({"chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
                     "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels})
    if truncated:
        print(f"note: {truncated} of {len(rows)} {what} pairs longer than {max_length} tokens were cut",
              flush=True)
    return rows


@dataclass
class PreferenceCollator:
    """A batch of B pairs as 2B right-padded rows: the chosen responses first, then the rejected ones."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(f[f"{side}_input_ids"], f[f"{side}_labels"]) for side in ("chosen", "rejected") for f in features]
        width = max(len(ids) for ids, _ in seqs)
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_token_id] * (width - len(ids)) for ids, _ in seqs]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in seqs]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs]),
        }
        if "reference_logps" in features[0]:
            batch["reference_logps"] = torch.tensor([f["reference_logps"][i] for i in (0, 1) for f in features],
                                                    dtype=torch.float32)
        return batch


# ---------------------------------------------------------------- the loss


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the response tokens' log-probabilities (float32) and how many there are. One row's
    float32 log-softmax at a time: [rows, length, vocab] in float32 never exists whole."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    sums = []
    for row in range(logits.shape[0]):
        token_logps = -F.cross_entropy(logits[row, :-1].float(), labels[row].clamp(min=0), reduction="none")
        sums.append((token_logps * mask[row]).sum())
    return torch.stack(sums), mask.sum(-1)


def preference_loss(policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, loss: str,
                    beta: float, gamma: float) -> tuple[torch.Tensor, dict]:
    """The mean loss over pairs and the rewards behind it. `policy`, `counts`, `reference`: 2B values, the chosen
    responses' first."""
    n = policy.shape[0] // 2
    if loss == "dpo":
        rewards = beta * (policy - reference.to(policy))
        logits = rewards[:n] - rewards[n:]
    else:
        rewards = beta * policy / counts.clamp(min=1)
        logits = rewards[:n] - rewards[n:] - gamma
    losses = -F.logsigmoid(logits)
    c, r = rewards[:n].detach(), rewards[n:].detach()
    stats = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
             "rewards/accuracies": (c > r).float().mean(), "logps/chosen": policy[:n].detach().mean(),
             "logps/rejected": policy[n:].detach().mean()}
    return losses.mean(), stats


class PreferenceTrainer(Trainer):
    """A Trainer whose loss is DPO or SimPO over PreferenceCollator batches; the reward statistics are averaged
    over each logging interval (and each evaluation) and logged beside the loss."""

    def __init__(self, *args, loss: str = "dpo", beta: float = 0.1, gamma: float = 1.0, **kwargs):
        kwargs["args"].remove_unused_columns = False  # the pair fields are not forward() arguments
        super().__init__(*args, **kwargs)
        self.loss_type, self.beta, self.gamma = loss, beta, gamma
        self.model_accepts_loss_kwargs = False  # the loss is a mean per pair: gradient accumulation divides it
        self._stats = defaultdict(lambda: defaultdict(list))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs.pop("reference_logps", None)
        if self.loss_type == "dpo" and reference is None:
            raise ConfigError("DPO needs the reference log-probs (precompute_reference_logps) in the data")
        labels = inputs.pop("labels")
        logits = model(**inputs, use_cache=False).logits
        policy, counts = response_logps(logits, labels)
        loss, stats = preference_loss(policy, counts, reference, self.loss_type, self.beta, self.gamma)
        split = "train" if model.training else "eval"
        for key, value in stats.items():
            self._stats[split][key].append(value.item())
        return (loss, {"margins": stats["rewards/margins"].reshape(1)}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, dict(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        for key, values in self._stats.pop(split, {}).items():
            logs[f"eval_{key}" if split == "eval" else key] = round(sum(values) / len(values), 4)
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------- the reference


def _digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row["chosen_input_ids"], row["rejected_input_ids"], row["chosen_labels"],
                             row["rejected_labels"]]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()  # not inference_mode: the model trains next, and must not keep inference tensors
def reference_logps(model, rows: list[dict], collator: PreferenceCollator, batch_size: int) -> list[list[float]]:
    """[chosen, rejected] summed response log-probs under `model` as it is now, for every encoded pair."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", leave=False):
        batch = collator(rows[start:start + batch_size])
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
        sums, _ = response_logps(logits, labels.to(device))
        n = len(sums) // 2
        out += [[c, r] for c, r in zip(sums[:n].tolist(), sums[n:].tolist())]
    model.train(was_training)
    return out


def attach_reference_logps(trainer: PreferenceTrainer, datasets: dict[str, list[dict]]) -> None:
    """Give every encoded pair its reference log-probs: computed now with the starting model, or read back from
    output_dir (a resumed run: the model has trained since) when they were computed for these very pairs."""
    path = Path(trainer.args.output_dir) / REFERENCE_FILE
    wanted = {name: _digest(rows) for name, rows in datasets.items() if rows}
    saved = json.loads(path.read_text()) if path.exists() else {}
    values = {}
    for name, digest in wanted.items():
        if saved.get(name, {}).get("digest") == digest:
            values[name] = saved[name]["logps"]
            print(f"[preference] {name}: reference log-probs read from {path}", flush=True)
        else:
            model = trainer.model
            if trainer.args.device.type == "cuda" and next(model.parameters()).device.type == "cpu":
                model.to(trainer.args.device)  # under DeepSpeed the Trainer places it only when training starts
            values[name] = reference_logps(model, datasets[name], trainer.data_collator,
                                           trainer.args.per_device_eval_batch_size)
    for name, logps in values.items():
        for row, pair in zip(datasets[name], logps):
            row["reference_logps"] = pair
    if trainer.is_world_process_zero() and any(saved.get(n, {}).get("digest") != d for n, d in wanted.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {name: {"digest": wanted[name], "logps": values[name]} for name in wanted})
