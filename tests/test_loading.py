import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from novelkit.errors import ConfigError, ModelError
from novelkit.models.loading import load_model, load_tokenizer, resolve_model_path, write_base_fingerprint


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model folder: it has no config.json"):
        resolve_model_path(str(tmp_path))


def test_adapter_folder_given_as_model_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="looks like a PEFT adapter"):
        resolve_model_path(str(tmp_path))


def test_default_model_loads_and_tokenizes(default_model_dir):
    tok = load_tokenizer(None)
    model = load_model(None, device="cpu")
    assert model.config.vocab_size == len(tok)
    ids = tok("第一章 山门夜雨", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == len(tok)
    assert tok.decode(ids.input_ids[0]) == "第一章 山门夜雨"
    meta = json.loads((default_model_dir / "novelkit_default.json").read_text())
    assert default_model_dir.name.endswith(meta["hash"])


def _adapter(base, out):
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.save_pretrained(out)
    write_base_fingerprint(out, base.config)


def test_adapter_for_another_base(tmp_path, default_model_dir):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    _adapter(other, tmp_path / "adapter")
    with pytest.raises(ModelError, match="made for another base model.*hidden_size 32 vs 128"):
        load_model(str(default_model_dir), device="cpu", adapter=str(tmp_path / "adapter"))


def test_foreign_adapter_without_fingerprint_still_gets_a_clear_error(tmp_path, default_model_dir):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    _adapter(other, tmp_path / "adapter")
    (tmp_path / "adapter" / "novelkit_base.json").unlink()
    with pytest.raises(ModelError, match="does not fit this base model"):
        load_model(str(default_model_dir), device="cpu", adapter=str(tmp_path / "adapter"))


def test_not_an_adapter(tmp_path, default_model_dir):
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_model(str(default_model_dir), device="cpu", adapter=str(tmp_path))


def test_bad_dtype(default_model_dir):
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(default_model_dir), dtype="fp8")


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(ModelError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))
