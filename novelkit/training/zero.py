"""DeepSpeed ZeRO around the HF Trainer: resuming a checkpoint on another number of processes, and checking that a
saved model (ZeRO-3's consolidated 16-bit weights, or a LoRA adapter) reloads to the very model that was trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from ..errors import ModelError


def join_cpu_processes(targs) -> None:
    """DeepSpeed on CPUs (several torchrun processes, --use_cpu): accelerate joins them with plain torch.distributed,
    which DeepSpeed's own communication layer does not see, so it would size batches for one process. Call after
    parsing the TrainingArguments."""
    if targs.deepspeed and targs.use_cpu and targs.world_size > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # wraps the process group accelerate already made


def saved_world_size(step_dir: Path) -> int:
    """Processes that wrote a DeepSpeed checkpoint folder (global_stepN): one optimizer shard file each."""
    return len(list(step_dir.glob("*optim_states.pt")))


def prepare_resume(trainer, checkpoint: str | None) -> None:
    """Let `trainer` resume `checkpoint` when it was written by another number of processes.

    DeepSpeed stores the optimizer state as one shard per process, which only the same number of processes can load.
    Its universal format holds each parameter whole: rank 0 converts the checkpoint once (ds_to_universal, written
    beside it as global_stepN_universal), and DeepSpeed is told to load that ("checkpoint": {"load_universal": true}).
    """
    if not checkpoint or not trainer.is_deepspeed_enabled:
        return
    steps = [p for p in Path(checkpoint).glob("global_step*") if p.is_dir() and not p.name.endswith("_universal")]
    if not steps:
        return
    step_dir = steps[0]
    saved, now = saved_world_size(step_dir), trainer.args.world_size
    if saved == now:
        return
    universal = step_dir.with_name(step_dir.name + "_universal")
    print(f"[zero] {checkpoint} was written by {saved} processes, resuming with {now}: loading its universal form "
          f"{universal.name}", flush=True)
    if trainer.is_world_process_zero() and not (Path(checkpoint) / "latest_universal").exists():
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                               "--input_folder", str(step_dir), "--output_folder", str(universal),
                               "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(f"cannot convert {step_dir} to DeepSpeed's universal checkpoint: "
                             f"{(done.stderr.strip().splitlines() or ['(no message)'])[-1]}")
    trainer.accelerator.wait_for_everyone()
    for config in {id(c): c for c in (trainer.accelerator.state.deepspeed_plugin.deepspeed_config,
                                      trainer.args.hf_deepspeed_config.config)}.values():
        config.setdefault("checkpoint", {})["load_universal"] = True


def probe_ids(trainer, length: int = 64) -> torch.Tensor:
    """A fixed input for comparing models: the start of the first training sample (a preference pair's chosen)."""
    first = trainer.train_dataset[0]
    return torch.tensor([list(first.get("input_ids", first.get("chosen_input_ids"))[:length])])


@torch.no_grad()
def live_logits(trainer, ids: torch.Tensor) -> torch.Tensor:
    """The trained model's logits. Under ZeRO-3 every process must call this: the layers gather their parameters."""
    model = trainer.model
    model.eval()
    return model(input_ids=ids.to(trainer.args.device)).logits.float().cpu()


@torch.no_grad()
def reloaded_logits(folder: str, ids: torch.Tensor, dtype: torch.dtype, device, four_bit: bool = False):
    """Logits of what was saved in `folder`, loaded the ordinary way (from_pretrained; a PEFT adapter on its base,
    quantised to 4 bits again for QLoRA)."""
    from ..models.loading import adapter_base_path, load_model

    if four_bit:
        from ..models.quantization import load_4bit_model

        model = load_4bit_model(adapter_base_path(folder), device=str(device), adapter=folder)
    elif (Path(folder) / "adapter_config.json").exists():
        model = load_model(adapter_base_path(folder), dtype=dtype, device=str(device), adapter=folder)
        model.to(dtype)  # PEFT loads adapters in fp32; the live one trained in `dtype`
    else:
        model = load_model(folder, dtype=dtype, device=str(device))
    model.eval()
    return model(input_ids=ids.to(device)).logits.float().cpu()


def check_saved_matches_live(trainer, folder: str, tag: str) -> float | None:
    """Reload the saved model on the main process and compare its logits with the live model's on the same input;
    raises when they differ by more than rounding. Returns the largest difference (None on other processes)."""
    ids = probe_ids(trainer)
    live = live_logits(trainer, ids)
    worst = None
    if trainer.is_world_process_zero():
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        dtype = next(trainer.model.parameters()).dtype
        zero_config = getattr(trainer.args, "hf_deepspeed_config", None)
        unset_hf_deepspeed_config()  # else from_pretrained here would wait for the other processes to partition it
        try:
            four_bit = getattr(trainer.model.config, "quantization_config", None) is not None
            again = reloaded_logits(folder, ids, dtype, trainer.args.device, four_bit)
        finally:
            if zero_config is not None:
                set_hf_deepspeed_config(zero_config)
        worst = (again - live).abs().max().item()
        scale = live.abs().max().item()
        print(f"[{tag}] reloaded {folder}: logits max |diff| {worst:.3g} (max |logit| {scale:.3g}, {dtype})",
              flush=True)
        if not worst <= 1e-3 * max(scale, 1.0):
            raise ModelError(f"{folder}: the reloaded model's logits differ from the trained model's by {worst:.3g}")
    trainer.accelerator.wait_for_everyone()
    return worst
