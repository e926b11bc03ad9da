"""Baichuan without remote code: reproduce the original code's outputs, load/save real layouts, generate, convert."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaForCausalLM

from novelkit.models.baichuan import (
    VARIANTS,
    BaichuanConfig,
    BaichuanForCausalLM,
    BaichuanTokenizer,
    is_baichuan_folder,
    load_baichuan,
    register,
    tiny_config,
)
from novelkit.errors import ModelError
from novelkit.models.baichuan.convert_to_llama import convert_to_llama, main as convert_main
from novelkit.models.baichuan.modeling_baichuan import CACHE_KEY, NormHead
from tiny_baichuan import random_model

FIXTURES = ["baichuan1-7b", "baichuan2-7b"]
ATOL = 1e-4


def left_padded_batch(lengths, total, seed=0):
    """input_ids / attention_mask of rows with `lengths` real tokens, left-padded with id 0 to `total`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 1000, (len(lengths), total), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, : total - length] = 0
        attention_mask[row, : total - length] = 0
    return input_ids, attention_mask


# --- Reference fixtures: outputs of the original code -------------------------------------------------------------


@pytest.fixture(scope="module", params=FIXTURES)
def reference(request, shared_assets):
    folder = shared_assets / "baichuan_reference" / request.param
    tensors = load_file(str(folder / "reference.safetensors"))
    return folder, tensors, load_baichuan(folder).eval()


def test_reference_eval(reference):
    folder, ref, model = reference
    with torch.no_grad():
        out = model(
            ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["input_ids"], output_hidden_states=True
        )
    torch.testing.assert_close(out.logits, ref["logits_eval"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(torch.stack(out.hidden_states), ref["hidden_states_eval"], atol=ATOL, rtol=ATOL)
    assert abs(out.loss.item() - ref["loss_eval"].item()) < 1e-5
    # The original rewrote NormHead's weight in place at the first eval forward; ours leaves the checkpoint's raw rows.
    stored = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, stored)


def test_reference_padded(reference):
    _, ref, model = reference
    with torch.no_grad():
        logits = model(ref["input_ids_padded"], attention_mask=ref["attention_mask_padded"]).logits
    keep = ref["attention_mask_padded"].bool()
    torch.testing.assert_close(logits[keep], ref["logits_eval_padded"][keep], atol=ATOL, rtol=ATOL)


def test_reference_train_mode(reference):
    folder, ref, model = reference
    model.train()
    try:
        out = model(ref["input_ids"], labels=ref["input_ids"])
    finally:
        model.eval()
    torch.testing.assert_close(out.logits.detach(), ref["logits_train"], atol=ATOL, rtol=ATOL)
    assert abs(out.loss.item() - ref["loss_train"].item()) < 1e-5
    if "loss_train_zloss1e-3" in ref:
        with_z_loss = load_baichuan(folder, z_loss_weight=1e-3).train()
        loss = with_z_loss(ref["input_ids"], labels=ref["input_ids"]).loss
        assert abs(loss.item() - ref["loss_train_zloss1e-3"].item()) < 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_reference_greedy_generation(reference, use_cache):
    _, ref, model = reference
    single = model.generate(
        ref["input_ids"][:1],
        attention_mask=ref["attention_mask"][:1],
        max_new_tokens=10,
        do_sample=False,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(single.sequences, ref["gen_tokens"])
    torch.testing.assert_close(torch.stack(single.scores), ref["gen_scores"], atol=ATOL, rtol=ATOL)

    batch = model.generate(
        ref["input_ids_padded"],
        attention_mask=ref["attention_mask_padded"],
        max_new_tokens=10,
        do_sample=False,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(batch.sequences, ref["gen_padded_tokens"])
    torch.testing.assert_close(torch.stack(batch.scores), ref["gen_padded_scores"], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_precision(shared_assets, dtype):
    folder = shared_assets / "baichuan_reference" / "baichuan2-7b"
    ref = load_file(str(folder / "reference.safetensors"))
    model = load_baichuan(folder, dtype=dtype, device_map="cpu").eval()
    assert model.dtype == dtype and model.lm_head.weight.dtype == dtype
    with torch.no_grad():
        logits = model(ref["input_ids_padded"], attention_mask=ref["attention_mask_padded"]).logits
    keep = ref["attention_mask_padded"].bool()
    torch.testing.assert_close(logits[keep].float(), ref["logits_eval_padded"][keep], atol=0.15, rtol=0)


def test_sharded_bin_checkpoint(shared_assets, tmp_path):
    """pytorch_model-0000k-of-0000n.bin shards + index, including Baichuan-7B's rotary_emb.inv_freq buffers."""
    folder = shared_assets / "baichuan_reference" / "baichuan1-7b"
    ref = load_file(str(folder / "reference.safetensors"))
    state = load_file(str(folder / "model.safetensors"))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in (0, 1)})
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2]}
    shards["pytorch_model-00002-of-00002.bin"] = names[len(names) // 2 :]
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({key: state[key] for key in keys}, tmp_path / shard)
        weight_map.update({key: shard for key in keys})
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    shutil.copy(folder / "config.json", tmp_path / "config.json")

    model = load_baichuan(tmp_path).eval()
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits_eval"], atol=ATOL, rtol=ATOL)


def test_auto_classes_without_remote_code(shared_assets, tmp_path):
    folder = shared_assets / "baichuan_reference" / "baichuan2-7b"
    register()
    register()  # idempotent
    assert isinstance(AutoConfig.from_pretrained(folder), BaichuanConfig)
    for trust_remote_code in (None, True):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
        assert type(model) is BaichuanForCausalLM
    assert is_baichuan_folder(folder)
    assert not is_baichuan_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_baichuan_folder(tmp_path)
    with pytest.raises(ModelError, match="not a Baichuan model folder"):
        load_baichuan(tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("baichuan1", [31106, 31745, 32213, 31175, 14830, 72, 19254, 1275, 80, 31106, 54, 52, 54, 55, 31189]),
        ("baichuan2", [70335, 92366, 9528, 65, 23160, 2063, 73, 92311, 92338, 92335, 92338, 92354, 92381]),
    ],
)
def test_auto_tokenizer(shared_assets, name, expected):
    register()
    tokenizer = AutoTokenizer.from_pretrained(shared_assets / "tokenizers" / name)
    assert isinstance(tokenizer, BaichuanTokenizer)
    assert tokenizer("百川大模型，Hello world! 2023年")["input_ids"] == expected


# --- Configuration rules ------------------------------------------------------------------------------------------

AUTO_MAP_7B = {
    "AutoConfig": "configuration_baichuan.BaiChuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM",
}
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
}
COMMON = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "model_type": "baichuan",
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "use_cache": True,
}
SIZES_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32}
SIZES_13B = {"hidden_size": 5120, "intermediate_size": 13696, "num_attention_heads": 40, "num_hidden_layers": 40}
# The field sets of the published config.json files (torch_dtype and transformers_version left out).
PUBLISHED_CONFIGS = {
    "baichuan-7b": {
        **COMMON,
        **SIZES_7B,
        "architectures": ["BaiChuanForCausalLM"],
        "auto_map": AUTO_MAP_7B,
        "max_position_embeddings": 4096,
        "vocab_size": 64000,
    },
    "baichuan-13b": {
        **COMMON,
        **SIZES_13B,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_max_length": 4096,
        "vocab_size": 64000,
    },
    "baichuan2-7b": {
        **COMMON,
        **SIZES_7B,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": AUTO_MAP,
        "max_position_embeddings": 4096,
        "model_max_length": 4096,
        "tokenizer_class": "BaichuanTokenizer",
        "vocab_size": 125696,
        "z_loss_weight": 0,
    },
    "baichuan2-13b": {
        **COMMON,
        **SIZES_13B,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_max_length": 4096,
        "tokenizer_class": "BaichuanTokenizer",
        "vocab_size": 125696,
        "z_loss_weight": 0,
    },
}
KINDS = {  # variant: (ALiBi, NormHead)
    "baichuan-7b": (False, False),
    "baichuan-13b": (True, False),
    "baichuan2-7b": (False, True),
    "baichuan2-13b": (True, True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_published_config_kind_and_fields(variant, tmp_path):
    fields = PUBLISHED_CONFIGS[variant]
    (tmp_path / "config.json").write_text(json.dumps({**fields, "torch_dtype": "bfloat16"}))
    config = BaichuanConfig.from_pretrained(tmp_path)
    assert (config.use_alibi, config.use_norm_head) == KINDS[variant]
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {key: saved.get(key) for key in fields} == fields
    assert set(saved) - set(fields) <= {"dtype", "transformers_version"}


def test_config_rules_and_overrides():
    assert BaichuanConfig().use_alibi  # the defaults are Baichuan-13B's
    assert BaichuanConfig(vocab_size=125696).use_norm_head  # Baichuan 2 vocabulary without z_loss_weight
    assert BaichuanConfig(max_position_embeddings=4096, position_embedding="alibi").use_alibi
    assert not BaichuanConfig(z_loss_weight=0, norm_head=False).use_norm_head
    assert BaichuanConfig(position_embedding="rope").use_alibi is False
    with pytest.raises(ValueError, match="position_embedding"):
        BaichuanConfig(position_embedding="learned")
    with pytest.raises(ValueError, match="unknown Baichuan variant"):
        tiny_config("baichuan3-7b")
    assert tiny_config("baichuan2-13b", vocab_size=125696).vocab_size == 125696


# --- Every variant, tiny random weights -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(variant, tmp_path):
    model = random_model(variant)
    input_ids, attention_mask = left_padded_batch([9, 6], 9)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == tiny_config(variant).auto_map
    assert saved["architectures"] == PUBLISHED_CONFIGS[variant]["architectures"]
    for key in ("max_position_embeddings", "model_max_length", "z_loss_weight", "tokenizer_class"):
        assert (key in saved) == (key in PUBLISHED_CONFIGS[variant])
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(model.state_dict())
    assert "model.layers.1.self_attn.W_pack.weight" in state and "lm_head.weight" in state

    register()
    for loaded in (BaichuanForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids, attention_mask=attention_mask).logits, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_matches_unpadded(variant):
    model = random_model(variant)
    input_ids, attention_mask = left_padded_batch([10, 6, 3], 10)
    with torch.no_grad():
        batch = model(input_ids, attention_mask=attention_mask).logits
        for row in range(3):
            keep = attention_mask[row].bool()
            alone = model(input_ids[row : row + 1, keep]).logits[0]
            torch.testing.assert_close(batch[row, keep], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_recomputation(variant):
    model = random_model(variant)
    input_ids, attention_mask = left_padded_batch([8, 5], 8)
    with torch.no_grad():
        # Chunked prefill: 5 tokens, then 3 more against the cache, equals one full forward.
        full = model(input_ids, attention_mask=attention_mask).logits
        # under the installed transformers' name for the cache, and under the other one (older callers)
        for first_key, rest_key in ((CACHE_KEY, CACHE_KEY), ("past_key_values", "cache")):
            cache = DynamicCache()
            out = model(input_ids[:, :5], attention_mask=attention_mask[:, :5], **{first_key: cache})
            assert getattr(out, CACHE_KEY) is cache
            first = out.logits
            rest = model(input_ids[:, 5:], attention_mask=attention_mask, **{rest_key: cache}).logits
            assert cache.get_seq_length() == 8
            keep = attention_mask.bool()
            torch.testing.assert_close(torch.cat([first, rest], 1)[keep], full[keep], atol=1e-5, rtol=1e-5)

    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    cached = model.generate(input_ids, use_cache=True, output_scores=True, **kwargs)
    recomputed = model.generate(input_ids, use_cache=False, output_scores=True, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), atol=1e-5, rtol=1e-5)
    # Each row of the batch generates what it generates alone.
    for row, length in enumerate([8, 5]):
        alone = model.generate(input_ids[row : row + 1, 8 - length :], max_new_tokens=8, do_sample=False)
        assert torch.equal(alone[0, length:], cached.sequences[row, 8:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_and_several_sequences(variant):
    """Beam search reorders the cache between steps: with and without the cache it returns the same beams, and each
    returned beam's score is its log-probability recomputed by one full forward (length_penalty 0: the plain sum)."""
    model = random_model(variant)
    input_ids, attention_mask = left_padded_batch([8, 5], 8, seed=1)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                  length_penalty=0.0, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    assert cached.sequences.shape[0] == 4  # 2 prompts x 2 returned beams
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=1e-5)

    mask = torch.cat([attention_mask.repeat_interleave(2, 0),
                      torch.ones(4, cached.sequences.shape[1] - 8, dtype=torch.long)], 1)
    with torch.no_grad():
        logprobs = model(cached.sequences, attention_mask=mask).logits.float().log_softmax(-1)
    for row in range(4):
        total = 0.0
        for position in range(8, cached.sequences.shape[1]):
            token = cached.sequences[row, position].item()
            total += logprobs[row, position - 1, token].item()
            if token == model.config.eos_token_id:
                break
        assert abs(total - cached.sequences_scores[row].item()) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_position_encoding_and_head_kind(variant):
    """The kind-specific parts are live: positions change the logits; NormHead ignores the scale of each row."""
    model = random_model(variant)
    input_ids, _ = left_padded_batch([7], 7)
    alibi, norm_head = KINDS[variant]
    assert isinstance(model.lm_head, NormHead) == norm_head
    with torch.no_grad():
        logits = model(input_ids).logits
        swapped = random_model(variant, position_embedding="rope" if alibi else "alibi")
        assert (swapped(input_ids).logits - logits).abs().max() > 0.1
        model.lm_head.weight.mul_(torch.linspace(0.5, 2.0, model.config.vocab_size)[:, None])
        rescaled = model(input_ids).logits
    assert torch.allclose(rescaled, logits, atol=1e-5) == norm_head


def test_resize_token_embeddings_keeps_norm_head():
    model = random_model("baichuan2-7b")
    model.resize_token_embeddings(1010)
    assert isinstance(model.lm_head, NormHead) and model.lm_head.weight.shape == (1010, 64)
    input_ids = torch.tensor([[5, 1005, 7]])
    with torch.no_grad():
        logits = model(input_ids).logits
        hidden = model.model(input_ids).last_hidden_state
    # Against unit rows each logit is at most the hidden state's norm (Cauchy-Schwarz).
    assert logits.shape == (1, 3, 1010)
    assert (logits.abs() <= hidden.norm(dim=-1)[..., None] + 1e-4).all()


# --- Llama conversion -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_convert_to_llama(shared_assets, tmp_path, name):
    src = tmp_path / "src"
    shutil.copytree(shared_assets / "baichuan_reference" / name, src)
    for path in (shared_assets / "tokenizers" / "baichuan2").iterdir():
        shutil.copy(path, src / path.name)
    ref = load_file(str(src / "reference.safetensors"))

    convert_main([str(src), str(tmp_path / "llama")])
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        logits = llama(ref["input_ids_padded"], attention_mask=ref["attention_mask_padded"]).logits
    keep = ref["attention_mask_padded"].bool()
    torch.testing.assert_close(logits[keep], ref["logits_eval_padded"][keep], atol=ATOL, rtol=ATOL)

    tokenizer_config = json.loads((tmp_path / "llama" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "BaichuanTokenizer" and "auto_map" not in tokenizer_config
    tokenizer = BaichuanTokenizer.from_pretrained(tmp_path / "llama")
    assert tokenizer("百川大模型")["input_ids"] == [70335, 92366, 9528]


def test_convert_alibi_is_refused(tmp_path, capsys):
    random_model("baichuan2-13b").save_pretrained(tmp_path / "src")
    with pytest.raises(ModelError, match="no ALiBi"):
        convert_to_llama(tmp_path / "src", tmp_path / "dst")
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "src"), str(tmp_path / "dst")])
    assert exit_info.value.code == 2 and "no ALiBi" in capsys.readouterr().err
