import pytest
import torch

from novelkit.data.features import IGNORE_INDEX, SFTCollator, encode_sft, encode_sft_dataset, left_pad, pack_documents
from novelkit.data.formats import Sample
from novelkit.data.templates import get_template


@pytest.fixture(scope="module")
def tok(shared_assets):
    from novelkit.models.baichuan.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer.from_pretrained(shared_assets / "tokenizers" / "baichuan2")


T = get_template("baichuan2")


def learned(enc):
    return [i for i in enc.labels if i != IGNORE_INDEX]


def test_long_prompt_is_cut_and_response_kept(tok):
    response = "他推开门，看见满院的梨花。"
    s = Sample(prompt="指令：续写。" + "很长的背景" * 200, response=response)
    enc = encode_sft(tok, T, s, max_length=64)
    assert len(enc.input_ids) == 64 and enc.truncated
    assert tok.decode(learned(enc)) == response + "</s>"
    # the beginning of the query (the instruction) survives, the marker closing the user turn too
    assert tok.decode(enc.input_ids[1:4]).startswith("指令") and 196 in enc.input_ids


def test_long_response_is_cut_after_prompt_keeps_a_quarter(tok):
    s = Sample(prompt="写" * 100, response="山" * 500)
    enc = encode_sft(tok, T, s, max_length=80)
    assert len(enc.input_ids) == 80 and enc.truncated
    assert 2 not in learned(enc)  # a cut response does not learn to stop
    query_tokens = enc.input_ids.index(196) - 1
    assert query_tokens >= 80 // 4


def test_oldest_history_dropped_first(tok):
    s = Sample(prompt="现在", response="好", history=[("旧" * 50, "答" * 50), ("近", "嗯")])
    enc = encode_sft(tok, T, s, max_length=20)
    text = tok.decode(enc.input_ids)
    assert "旧" not in text and "近" in text and enc.truncated


def test_short_sample_untouched_and_report(tok, capsys):
    rows = encode_sft_dataset(tok, T, [Sample("问", "答"), Sample("长" * 300, "答", meta={"path": "a.jsonl", "line": 2})],
                              max_length=32)
    assert len(rows) == 2
    err = capsys.readouterr().err
    assert "1 of 2 training samples longer than max_length=32 had history or prompt cut" in err and "a.jsonl:2" in err


def test_collator_pads_right():
    batch = SFTCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_left_pad():
    b = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_packing_loses_no_token():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 100, (int(n),), generator=g).tolist() for n in torch.randint(1, 50, (40,), generator=g)]
    blocks = list(pack_documents(docs, block_size=16, eos_token_id=2))
    assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    stream = [t for b in blocks for t in b]
    assert stream == [t for d in docs for t in (*d, 2)]
