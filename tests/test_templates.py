"""Exact token ids and labels for every template, on the real Baichuan tokenizers and the embedded default."""

import pytest
import sentencepiece as spm

from novelkit.models.baichuan.tokenization_baichuan import BaichuanTokenizer
from novelkit.data.features import IGNORE_INDEX, encode_sft
from novelkit.data.formats import Sample
from novelkit.data.templates import (TEMPLATES, default_template_name, encode_prompt, encode_sample, get_template,
                                stop_token_ids)

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def bc2(shared_assets):
    folder = shared_assets / "tokenizers" / "baichuan2"
    return BaichuanTokenizer.from_pretrained(folder), spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def bc1(shared_assets):
    folder = shared_assets / "tokenizers" / "baichuan1"
    return BaichuanTokenizer.from_pretrained(folder), spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def flat(tokenizer, name, sample, max_length=4096):
    enc = encode_sft(tokenizer, get_template(name), sample, max_length)
    return enc.input_ids, enc.labels


def test_baichuan2_single_turn_matches_baichuan2_finetune_layout(bc2):
    tok, sp = bc2
    q, r = sp.encode("写一段开头"), sp.encode("夜雨落在山门前。")
    ids, labels = flat(tok, "baichuan2", Sample(prompt="写一段开头", response="夜雨落在山门前。"))
    # Baichuan 2's own fine-tune.py: user id 195, query, assistant id 196, response, eos 2; only response+eos learned
    assert ids == [195, *q, 196, *r, 2]
    assert labels == [M] * (len(q) + 2) + [*r, 2]


def test_baichuan2_multi_turn_learns_every_answer_and_masks_every_user_turn(bc2):
    tok, sp = bc2
    s = Sample(prompt="第二问", response="第二答", history=[("第一问", "第一答")])
    ids, labels = flat(tok, "baichuan2", s)
    q1, a1, q2, a2 = (sp.encode(t) for t in ("第一问", "第一答", "第二问", "第二答"))
    assert ids == [195, *q1, 196, *a1, 2, 195, *q2, 196, *a2, 2]
    assert labels == [M] * (len(q1) + 2) + [*a1, 2] + [M] * (len(q2) + 2) + [*a2, 2]


def test_baichuan1_markers_are_single_ids_without_dummy_prefix(bc1):
    tok, sp = bc1
    ids, labels = flat(tok, "baichuan", Sample(prompt="你好", response="好"))
    # <reserved_102>/<reserved_103> are ids 195/196 in Baichuan 1's vocabulary; the text keeps its dummy prefix
    assert ids == [195, *sp.encode("你好"), 196, *sp.encode("好"), 2]
    assert labels[-len(sp.encode("好")) - 1:] == [*sp.encode("好"), 2]


def test_system_text_goes_first_and_is_masked(bc2):
    tok, sp = bc2
    ids, labels = flat(tok, "baichuan2", Sample(prompt="问", response="答", system="你是小说作家。"))
    s = sp.encode("你是小说作家。")
    assert ids[: len(s) + 1] == [*s, 195]
    assert labels[: len(s)] == [M] * len(s)


@pytest.mark.parametrize(
    "name, pieces",
    [
        ("human_assistant", ["Human: \n", "{q}", "\n\nAssistant: \n", "{r}", "EOS"]),
        ("babyllama", ["人类：", "{q}", "\n助手：", "{r}", "EOS"]),
        ("plain", ["{q}", "{r}", "EOS"]),
        ("chatml", ["<|im_start|>system\n", "You are a helpful assistant.", "<|im_end|>\n", "<|im_start|>user\n",
                    "{q}", "<|im_end|>\n<|im_start|>assistant\n", "{r}", "<|im_end|>"]),
    ],
)
def test_text_templates_exact_ids(default_tokenizer, name, pieces):
    tok = default_tokenizer
    sp = spm.SentencePieceProcessor(model_file=tok.vocab_file)
    q, r = "少年遇见剑客", "雨停了。"
    expected, labels, learned = [], [], False
    for piece in pieces:
        ids = [2] if piece == "EOS" else sp.encode({"{q}": q, "{r}": r}.get(piece, piece))
        learned = learned or piece == "{r}"
        expected += ids
        labels += ids if learned else [M] * len(ids)
    assert flat(tok, name, Sample(prompt=q, response=r)) == (expected, labels)


def test_multi_turn_separator_is_masked(default_tokenizer):
    tok = default_tokenizer
    sp = spm.SentencePieceProcessor(model_file=tok.vocab_file)
    ids, labels = flat(tok, "human_assistant", Sample(prompt="二", response="乙", history=[("一", "甲")]))
    first = sp.encode("Human: \n") + sp.encode("一") + sp.encode("\n\nAssistant: \n")
    assert ids[: len(first)] == first
    sep_at = len(first) + len(sp.encode("甲")) + 1
    sep = sp.encode("\n\n")
    assert ids[sep_at:sep_at + len(sep)] == sep and labels[sep_at:sep_at + len(sep)] == [M] * len(sep)


def test_prompt_for_generation_stops_at_assistant_marker(bc2):
    tok, sp = bc2
    s = Sample(prompt="问", response="答", history=[("甲", "乙")])
    assert encode_prompt(tok, TEMPLATES["baichuan2"], s) == [195, *sp.encode("甲"), 196, *sp.encode("乙"), 2, 195,
                                                             *sp.encode("问"), 196]


def test_tokenizer_chat_template(default_tokenizer):
    tok = default_tokenizer
    tok.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
    )
    try:
        s = Sample(prompt="问", response="答", history=[("甲", "乙")])
        segments = encode_sample(tok, "tokenizer", s)
        ids = [i for seg, _ in segments for i in seg]
        labels = [i if kind in ("response", "end") else M for seg, kind in segments for i in seg]
        full = tok.apply_chat_template([{"role": "user", "content": "甲"}, {"role": "assistant", "content": "乙"},
                                        {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
                                       tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        assert ids == full
        learned = [i for i in labels if i != M]
        assert tok.decode(learned) == "乙</s>答</s>"
        assert tok.decode(encode_prompt(tok, "tokenizer", s)).endswith("<user>问</s><assistant>")
        assert default_template_name(tok) == "tokenizer"
    finally:
        tok.chat_template = None


def test_default_template_choice(bc2):
    from types import SimpleNamespace

    from novelkit.models.baichuan import tiny_config

    assert default_template_name(bc2[0], tiny_config("baichuan2-7b")) == "baichuan2"
    assert default_template_name(bc2[0], tiny_config("baichuan2-13b")) == "baichuan2"
    assert default_template_name(bc2[0], tiny_config("baichuan-13b")) == "baichuan"
    assert default_template_name(bc2[0], SimpleNamespace(model_type="qwen2", vocab_size=151936)) == "chatml"
    with pytest.raises(ValueError, match="unknown template"):
        get_template("nope")


def test_stop_tokens(bc2):
    assert stop_token_ids(bc2[0], TEMPLATES["baichuan2"]) == [2]
