"""bench/from_scratch.py's data: copying drills copy from their own text, and nothing scored is trained on."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from from_scratch import copy_drills, key_clause, make_data, title_clause  # noqa: E402


def test_copy_drills_are_spans_of_their_own_text():
    texts = ["机器学习在自然语言处理中的应用，本文综述了近年来的方法。我们发现，深度模型效果最好；未来可期。",
             "日前，某公司发布新品，售价一千元。"]
    for kind in ("span", "clause", "key"):
        for text, drill in zip(texts, copy_drills(texts, 5, kind=kind)):
            lines = drill.split("\n")
            assert lines[0] == text and len(lines) == 6
            spans = lines[1:]
            if kind == "key":
                assert spans[0] == "要点：" + key_clause(text)
                spans = spans[1:]
            for line in spans:
                span = line.removeprefix("摘录：")
                assert line.startswith("摘录：") and 6 <= len(span) <= 24 and span in text
                if kind != "span":
                    start = text.index(span)
                    assert start == 0 or text[start - 1] in "，。；：", span


def test_title_drills_pick_the_clause_closest_to_the_title():
    text = "日前，某公司在北京发布新款手机，售价一千元起。分析人士认为，此举意在抢占中端市场。"
    title = "某公司发布新款手机抢占中端市场"
    assert title_clause(text, title) == "某公司在北京发布新款手机"  # 10 characters in common with the title
    assert title_clause(text, "意在抢占中端市场") == "此举意在抢占中端市场"
    drill = copy_drills([text], 3, kind="title", titles=[title])[0].split("\n")
    assert drill[:2] == [text, "要点：某公司在北京发布新款手机"] and len(drill) == 4
    with pytest.raises(ValueError, match="one title per text"):
        copy_drills([text], 3, kind="title")


def test_key_clause_is_the_clause_most_like_the_rest():
    text = "天气很好。针对推荐算法冷启动的问题，提出一种基于知识图谱的推荐方法。该方法利用知识图谱改进推荐效果。"
    assert key_clause(text) == "提出一种基于知识图谱的推荐方法"  # shares 知识图谱, 推荐 with the rest; punctuation dropped
    assert key_clause("短。") == "短。"[:32].rstrip("。")  # no clause long enough: the text itself


def test_held_out_pairs_are_never_in_the_training_data(shared_data, tmp_path):
    data = make_data(shared_data.parent, tmp_path, tiny=False, drills=2)
    rows = {name: [json.loads(line) for line in data[name].read_text(encoding="utf-8").splitlines()]
            for name in ("train", "dev", "csl", "lcsts")}
    train_documents = {r["input"] for r in rows["train"]}
    corpus = "".join(p.read_text(encoding="utf-8") for p in data["corpus"].glob("*.txt"))
    for name in ("dev", "csl", "lcsts"):
        held = [r for r in rows[name] if r["input"] not in train_documents]
        assert len(held) == len(rows[name]), name  # no held-out document is a training pair's
        assert sum(r["input"][:50] in corpus for r in rows[name]) <= len(rows[name]) // 100, name
    assert data["counts"]["lcsts_val_repeating_train"] == 49  # dropped from the held-out side
    assert data["counts"]["csl_test"] == len(rows["csl"]) and data["counts"]["lcsts_test"] == len(rows["lcsts"]) == 751
