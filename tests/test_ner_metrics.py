"""Entity-level NER scores on hand-made answers, and recognising NER references in real MSRA data."""

import json

import pytest

from novelkit.evaluation.ner_metrics import entity_scores, is_ner_answer, parse_entities


def test_parse_entities():
    assert parse_entities("日_地名\n京_地名\n北京_地名") == {("日", "地名"), ("京", "地名"), ("北京", "地名")}
    assert parse_entities("没有") == set()
    assert parse_entities("  \n") == set()
    assert parse_entities("北京_地名\n北京_地名\n") == {("北京", "地名")}  # a repeated line is one entity
    assert parse_entities("C_p算法_机构名") == {("C_p算法", "机构名")}  # split at the last underscore
    assert parse_entities("我不知道") == {("我不知道", "")}  # not an answer line: a wrong entity


def test_hand_made_scores():
    refs = ["郑振铎_人名\n阿英_人名\n国民党_机构名", "北京市_地名", "没有", "姜德明_人名"]
    hyps = ["阿英_人名\n郑振铎_人名\n国民党_地名", "没有", "没有", "姜德明_人名\n北京_地名"]
    # gold 5 entities; predicted 5 (阿英, 郑振铎, 国民党_地名, 姜德明, 北京); correct 3 (阿英, 郑振铎, 姜德明)
    s = entity_scores(hyps, refs)
    assert (s["predicted"], s["gold"]) == (5, 5)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(3 / 5)
    assert s["exact_match"] == pytest.approx(1 / 4)  # only the 没有/没有 sample
    assert s["per_type"]["人名"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3})
    assert s["per_type"]["地名"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert s["per_type"]["机构名"]["recall"] == 0.0 and s["per_type"]["机构名"]["support"] == 1


def test_precision_and_recall_differ():
    s = entity_scores(["张三_人名\n李四_人名\n王五_人名\n上海_地名"], ["张三_人名\n上海_地名"])
    assert s["precision"] == pytest.approx(2 / 4) and s["recall"] == pytest.approx(1.0)
    assert s["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_perfect_and_empty_cases():
    refs = ["张三_人名", "没有"]
    assert entity_scores(refs, refs)["f1"] == 1.0 and entity_scores(refs, refs)["exact_match"] == 1.0
    nothing = entity_scores(["没有", "没有"], refs)
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    assert nothing["exact_match"] == 0.5
    with pytest.raises(ValueError):
        entity_scores(["没有"], refs)


def test_ner_references_are_recognised(shared_data):
    answers = [json.loads(line)["answer"] for line in (shared_data / "msra_ner" / "eval.jsonl").open(encoding="utf-8")]
    assert all(is_ner_answer(a) for a in answers)
    csl_abstract = (shared_data / "csl" / "clge_val.tsv").open(encoding="utf-8").readline().split("\t")[1]
    assert not is_ner_answer(csl_abstract)
    assert not is_ner_answer("") and not is_ner_answer("这是一段_普通的文字，里面有下划线")
