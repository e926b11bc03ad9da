"""Entity-level precision / recall / F1 for instruction NER answers in the `实体_类型` line format (MSRA, the QLoRA seed).

An answer is one entity per line, `text_type` (split at the last underscore, so an entity may contain one); `没有`
means no entity. Entities are compared as (text, type) sets per sample: a duplicate line counts once, order does not
matter, and a predicted line that is not `text_type` is a wrong entity (it costs precision). Scores are micro-averaged
over all samples, with a per-type breakdown and the share of samples answered exactly.
"""

from __future__ import annotations

NO_ENTITY = "没有"
_MAX_TYPE_CHARS = 10  # 人名, 地名, 机构名 …: a long "type" means the text is prose, not an answer


def parse_entities(answer: str) -> set[tuple[str, str]]:
    """{(entity, type)} of one answer; empty for `没有` or blank. A line without `_` becomes (line, "")."""
    entities = set()
    for line in answer.strip().splitlines():
        line = line.strip()
        if not line or line == NO_ENTITY:
            continue
        text, sep, kind = line.rpartition("_")
        entities.add((text.strip(), kind.strip()) if sep else (line, ""))
    return entities


def is_ner_answer(answer: str) -> bool:
    """True when the text is `没有` or lines of `entity_type` (how NER references are recognised)."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if lines == [NO_ENTITY]:
        return True
    for line in lines:
        text, sep, kind = line.rpartition("_")
        if not (sep and text.strip() and kind.strip()) or len(kind) > _MAX_TYPE_CHARS or " " in kind.strip():
            return False
    return bool(lines)


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_scores(predictions: list[str], references: list[str]) -> dict:
    """Micro P/R/F1 over all entities, per type, and exact_match (share of samples whose entity sets are equal)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    tp = n_pred = n_gold = exact = 0
    per_type: dict[str, list[int]] = {}  # type -> [tp, predicted, gold]
    for prediction, reference in zip(predictions, references):
        pred, gold = parse_entities(prediction), parse_entities(reference)
        hit = pred & gold
        tp, n_pred, n_gold, exact = tp + len(hit), n_pred + len(pred), n_gold + len(gold), exact + (pred == gold)
        for index, entities in ((0, hit), (1, pred), (2, gold)):
            for _, kind in entities:
                per_type.setdefault(kind, [0, 0, 0])[index] += 1
    return {
        **_prf(tp, n_pred, n_gold),
        "exact_match": exact / len(references) if references else 0.0,
        "predicted": n_pred,
        "gold": n_gold,
        "per_type": {kind: {**_prf(*counts), "support": counts[2]}
                     for kind, counts in sorted(per_type.items()) if counts[2]},
    }
