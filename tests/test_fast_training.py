"""The training fast path (novelkit.training.fast_training, chunked_loss, packing): same numbers as the plain way."""

import pytest
import torch
import torch.nn.functional as F
from tiny_baichuan import random_model

import novelkit.models.chunked_loss as chunked_loss
from novelkit.data.packing import PackedCollator, pack_rows
from novelkit.models.chunked_loss import linear_cross_entropy
from novelkit.training.fast_training import checkpoint_some_layers, decoder_layers, use_chunked_loss


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * 50 * 7)  # several chunks even for tiny inputs


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2)
    return Qwen2ForCausalLM(config).eval()


def tiny_qwen3(seed=0):
    """Qwen3 dense: per-head RMSNorm of queries and keys, head_dim apart from hidden / heads."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         initializer_range=0.2)
    return Qwen3ForCausalLM(config).eval()


def tiny_llama3(seed=0):
    """Llama 3's RoPE scaling (a short original context, so that it changes the angles), untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                       "rope_theta": 500000.0})
    return LlamaForCausalLM(config).eval()


HF_MODELS = {"qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "llama3": tiny_llama3}


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
@pytest.mark.parametrize("num_items", [None, 40])
def test_linear_cross_entropy_matches_plain(small_chunks, z_loss_weight, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::3] = -100
    loss = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items, z_loss_weight=z_loss_weight)
    loss.backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t()).float()
    if num_items is None:
        ref = F.cross_entropy(logits, labels)
    else:
        ref = F.cross_entropy(logits, labels, reduction="sum") / num_items
    ref = ref + z_loss_weight * logits.max(-1).values.pow(2).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], weight.grad, rtol=1e-5, atol=1e-7)


def gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["baichuan-7b", "baichuan2-13b"])
def test_baichuan_chunked_loss_same_loss_and_gradients(small_chunks, variant):
    model = random_model(variant, z_loss_weight=1e-3).train()  # baichuan2: NormHead and z-loss
    ids = torch.randint(3, 1000, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    plain_loss, plain = gradients(model, {"input_ids": ids, "labels": labels})
    assert use_chunked_loss(model)
    loss, grads = gradients(model, {"input_ids": ids, "labels": labels})
    assert model(input_ids=ids, labels=labels).logits is None  # no logits were made
    assert abs(loss - plain_loss) < 1e-5
    assert grads.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_hf_model_chunked_loss_same_numbers_and_untouched_outside_training(small_chunks, kind):
    model = HF_MODELS[kind]().train()
    ids = torch.randint(3, 1000, (2, 12))
    labels = ids.clone()
    labels[1, :4] = -100
    keys = list(model.state_dict())
    with torch.no_grad():
        eval_logits = model.eval()(ids).logits
    model.train()
    plain_loss, plain = gradients(model, {"input_ids": ids, "labels": labels})
    assert use_chunked_loss(model)
    loss, grads = gradients(model, {"input_ids": ids, "labels": labels})
    assert abs(loss - plain_loss) < 1e-5
    for name, grad in plain.items():  # a tied embedding/lm_head gets both of its gradients
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # evaluation and saving see the model as it was
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, eval_logits)
        assert model(ids, labels=labels).logits.shape[-1] == 1000


def test_pack_rows_keeps_every_token_and_fills_rows():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    samples = [{"input_ids": [n * 100 + i for i in range(n)], "labels": [-100] + [n] * (n - 1)} for n in lengths]
    rows = pack_rows(samples, capacity=12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert len(rows) == 4  # 44 tokens need at least 4 rows of 12
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for s in samples for t in s["input_ids"])
    for row in rows:  # each sample's positions count from 0 and its labels travel with it
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            n = b - a
            assert row["input_ids"][a:b] == [n * 100 + i for i in range(n)]
            assert row["labels"][a:b] == [-100] + [n] * (n - 1)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([{"input_ids": [1] * 13, "labels": [1] * 13}], capacity=12)


@pytest.mark.parametrize("make", [lambda: random_model("baichuan-7b"), lambda: random_model("baichuan2-13b"),
                                  tiny_qwen2, tiny_qwen3, tiny_llama3],
                         ids=["rope", "alibi", "qwen2", "qwen3", "llama3"])
def test_packed_row_equals_separate_samples(make):
    model = make()
    a, b, c = (torch.randint(3, 900, (n,)) for n in (7, 5, 4))
    batch = PackedCollator(pad_token_id=0)([
        {"input_ids": torch.cat([a, b]).tolist(), "labels": torch.cat([a, b]).tolist(),
         "position_ids": list(range(7)) + list(range(5))},
        {"input_ids": c.tolist(), "labels": c.tolist(), "position_ids": list(range(4))},
    ])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, start, ids in [(0, 0, a), (0, 7, b), (1, 0, c)]:
            alone = model(ids[None]).logits[0]
            torch.testing.assert_close(packed[row, start:start + len(ids)], alone, atol=1e-5, rtol=1e-4)


def test_checkpoint_some_layers_recomputes_only_those():
    model = random_model("baichuan2-7b", num_hidden_layers=3).train()
    calls = []
    for index, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda *_, i=index: calls.append(i))
    batch = {"input_ids": torch.randint(3, 1000, (2, 8)), "labels": torch.randint(3, 1000, (2, 8))}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, all_layers = gradients(model, batch)
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]
    calls.clear()
    checkpoint_some_layers(model, 1)
    _, some_layers = gradients(model, batch)
    assert sorted(calls) == [0, 0, 1, 2]  # only layer 0 ran again in backward
    for name, grad in all_layers.items():
        torch.testing.assert_close(some_layers[name], grad, msg=name)


def lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    model = random_model("baichuan2-7b", seed=seed, num_hidden_layers=2)
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def test_twenty_steps_within_one_percent_of_the_naive_loop():
    """The issue's numerics check on CPU: the naive loop (whole batch, logits, checkpointing of every layer) against
    our step (chunked loss, micro-batches of 1 with accumulation, checkpointing of one layer), same data and seed."""
    batches = [torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    data = [batches[step % 4] for step in range(20)]

    def run(ours: bool):
        model = lora_model()
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if ours:
            assert use_chunked_loss(model)
            checkpoint_some_layers(model, 1)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for ids in data:
            parts = ids.split(1) if ours else [ids]
            total = 0.0
            for part in parts:
                loss = model(input_ids=part, labels=part).loss
                (loss / len(parts)).backward()
                total += loss.item() / len(parts)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(total)
        return losses

    naive, ours = run(False), run(True)
    assert naive[-1] < naive[0] - 0.05  # it learns, so the comparison means something
    assert max(abs(a - b) / b for a, b in zip(ours, naive)) < 0.01


@pytest.mark.gpu
def test_gpu_packed_varlen_and_compiled_layers_match_plain():
    from novelkit.training.fast_training import compile_layers

    model = random_model("baichuan2-7b", num_hidden_layers=2).to("cuda", torch.bfloat16)
    a, b = torch.randint(3, 900, (70,)), torch.randint(3, 900, (50,))
    ids = torch.cat([a, b])[None].cuda()
    positions = torch.cat([torch.arange(70), torch.arange(50)])[None].cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        alone_b = model(b[None].cuda()).logits.float()
    assert (packed[0, 70:] - alone_b[0]).abs().max() < 0.05 * alone_b.abs().max()
    model.train()
    batch = {"input_ids": ids, "labels": ids}
    plain = model(**batch).loss.item()
    assert compile_layers(model)
    compiled = model(**batch).loss.item()
    assert abs(compiled - plain) < 0.01 * plain


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["liger", "torch"])
@pytest.mark.parametrize("trained_head", [True, False])
def test_gpu_linear_cross_entropy_kernels_match_float32(monkeypatch, kernel, trained_head):
    """Both GPU paths (Liger's fused kernel, and ours with the float32-accumulating addmm) against float32 autograd,
    at a real vocabulary width, with ignored tokens and the Trainer's num_items_in_batch."""
    if kernel == "liger":
        if chunked_loss.liger_linear_cross_entropy() is None:
            pytest.skip("liger-kernel is not installed")
    else:
        monkeypatch.setattr(chunked_loss, "liger_linear_cross_entropy", lambda: None)
    torch.manual_seed(0)
    hidden = (torch.randn(3000, 256, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(32000, 256, device="cuda") * 0.05).bfloat16().requires_grad_(trained_head)
    labels = torch.randint(0, 32000, (3000,), device="cuda")
    labels[::5] = -100
    assert chunked_loss.uses_liger(hidden) == (kernel == "liger")
    loss = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=2500)
    loss.backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_(trained_head)
    ref = F.cross_entropy(h32 @ w32.t(), labels, reduction="sum") / 2500
    ref.backward()
    assert abs(loss.item() - ref.item()) < 5e-3 * abs(ref.item())
    # bf16 logits and gradients (and Liger's bf16 sum of the head's gradient over its chunks): about 0.2-0.3% of
    # the gradients' norm, emulated on the CPU; a wrong scale or a lost chunk is off by tens of percent
    assert relative_error(hidden.grad, h32.grad) < 0.01
    if trained_head:
        assert relative_error(weight.grad, w32.grad) < 0.01


def relative_error(value, reference):
    return ((value.float() - reference).norm() / reference.norm()).item()


def test_packed_collator_pads_training_rows_to_the_width_and_eval_rows_to_their_longest():
    collate = PackedCollator(pad_token_id=0, width=16)
    packed = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 0]}])
    assert packed["input_ids"].shape == (1, 16) and packed["position_ids"][0, 3:].tolist() == list(range(13))
    unpacked = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert unpacked["input_ids"].shape == (2, 3)
    assert unpacked["labels"][1].tolist() == [8, -100, -100]


def test_an_epochs_short_last_batch_keeps_the_training_shape_and_its_loss():
    """The last batch of packed rows is padded with empty rows to the batch size (no recompilation of the compiled
    layers), and those rows change neither the summed loss nor the gradient."""
    row = {"input_ids": [5, 6, 7, 9], "labels": [-100, 6, 7, 9], "position_ids": [0, 1, 0, 1]}
    short, full = PackedCollator(0, width=8)([row]), PackedCollator(0, width=8, rows=4)([row])
    assert short["input_ids"].shape == (1, 8) and full["input_ids"].shape == (4, 8)
    assert (full["labels"][1:] == -100).all() and full["position_ids"][3].tolist() == list(range(8))
    assert PackedCollator(0, rows=4)([{"input_ids": [5], "labels": [5]}])["input_ids"].shape == (1, 1)  # eval rows
    model, grads = tiny_qwen2(), []
    for batch in (short, full):
        model.zero_grad()
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:].flatten(), reduction="sum")
        loss.backward()
        grads.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert abs(grads[0][0] - grads[1][0]) < 1e-4 * abs(grads[0][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
