"""Training Baichuan without remote code: gradient checkpointing, LoRA, QLoRA (4-bit on CPU), HF Trainer."""

import warnings

import pytest
import torch
from torch import nn

from novelkit.models.baichuan import VARIANTS, load_baichuan
from novelkit.models.baichuan.modeling_baichuan import BaichuanDecoderLayer, NormHead
from tiny_baichuan import random_model


def training_batch(seed=0):
    """Two rows, the second left-padded by 4; padding is ignored in the loss."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 1000, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :4] = 0
    attention_mask[1, :4] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def enable_checkpointing(model):
    with warnings.catch_warnings():
        # transformers 5.2x renames it activation_checkpointing_enable; the old name is the one users know.
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_same_gradients(variant):
    model = random_model(variant, z_loss_weight=1e-3).train()
    batch = training_batch()
    layer_calls = []
    for layer in model.modules():
        if isinstance(layer, BaichuanDecoderLayer):
            layer.register_forward_pre_hook(lambda *_: layer_calls.append(1))

    def gradients():
        model.zero_grad()
        layer_calls.clear()
        model(**batch).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, len(layer_calls)

    plain, plain_calls = gradients()
    enable_checkpointing(model)
    checkpointed, checkpointed_calls = gradients()
    # Each layer ran again during backward: checkpointing is on.
    assert (plain_calls, checkpointed_calls) == (2, 4)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def lora_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("target_modules", [["W_pack"], "all-linear"], ids=["W_pack", "all-linear"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_trains(variant, target_modules):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        random_model(variant), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)
    )
    wrapped = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    all_linear = {"W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert wrapped == ({"W_pack"} if target_modules == ["W_pack"] else all_linear)
    # The lm_head (NormHead in Baichuan 2) stays out of LoRA.
    assert type(model.base_model.model.lm_head) in (nn.Linear, NormHead)

    before = lora_weights(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = training_batch()
    losses = []
    model.train()
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = lora_weights(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)


def bnb_cpu_4bit_error():
    """Why bitsandbytes 4-bit cannot run on this CPU, or None when it can."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer.to("cpu")(torch.randn(1, 64))  # .to() quantises
    except Exception as error:  # any failure here means: no usable CPU 4-bit backend
        return f"{type(error).__name__}: {error}"
    return None


def test_qlora_4bit_on_cpu(tmp_path):
    reason = bnb_cpu_4bit_error()
    if reason:
        pytest.skip(f"bitsandbytes 4-bit is not available on this CPU ({reason})")
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    random_model("baichuan2-13b").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = load_baichuan(tmp_path, quantization_config=quantization, device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.W_pack, bnb.nn.Linear4bit)
    assert type(model.lm_head) is NormHead  # not quantised

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack", "o_proj"]))
    model(**training_batch()).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trainer_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = random_model("baichuan2-13b", z_loss_weight=1e-3)
    batch = training_batch()
    rows = [{key: value[i] for key, value in batch.items()} for i in range(2)] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing -> activation_checkpointing (5.2x)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
            learning_rate=1e-2,
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
    assert model.model.gradient_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # A per-batch mean loss (not scaled by the accumulation steps) that falls.
    assert len(losses) == 4 and 6.0 < losses[0] < 9.0 and losses[-1] < losses[0]
