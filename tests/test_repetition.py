"""novelkit.evaluation.repetition: distinct-n and repeated-n-gram rate against hand-computed values."""

import pytest

from novelkit.evaluation.repetition import corpus_distinct_n, distinct_n, ngrams, repeated_ngram_rate


def test_ngrams_of_characters_skip_whitespace():
    assert ngrams("我爱 我家\n", 2) == [("我", "爱"), ("爱", "我"), ("我", "家")]
    assert ngrams(["我们", "的", "家"], 2) == [("我们", "的"), ("的", "家")]
    assert ngrams("我", 2) == []
    with pytest.raises(ValueError, match="at least 1"):
        ngrams("我爱", 0)


def test_distinct_of_one_text_by_hand():
    # 我爱我家: unigrams 我 爱 我 家 -> 3 unique of 4; bigrams 我爱 爱我 我家 -> 3 of 3.
    assert distinct_n("我爱我家", 1) == 0.75
    assert distinct_n("我爱我家", 2) == 1.0
    # 哈哈哈哈: 1 unique character of 4; 1 unique bigram (哈哈) of 3.
    assert distinct_n("哈哈哈哈") == 0.25
    assert distinct_n("哈哈哈哈", 2) == pytest.approx(1 / 3)


def test_distinct_of_tokens_differs_from_characters():
    tokens = ["我们", "我们", "你们"]
    assert distinct_n(tokens, 1) == pytest.approx(2 / 3)
    # As characters 我们我们你们: 我 们 我 们 你 们 -> 3 unique of 6.
    assert distinct_n("".join(tokens), 1) == 0.5


def test_corpus_distinct_pools_texts_without_crossing_them():
    # Unigrams: 我 爱 我 爱 -> 2 of 4. Bigrams: 我爱 and 我爱 -> 1 of 2; 爱我 would only exist across texts.
    assert corpus_distinct_n(["我爱", "我爱"], 1) == 0.5
    assert corpus_distinct_n(["我爱", "我爱"], 2) == 0.5
    assert corpus_distinct_n([["我们", "好"], ["我们", "坏"]], 1) == 0.75
    with pytest.raises(TypeError, match="list of texts"):
        corpus_distinct_n("我爱我家")


def test_repeated_ngram_rate_by_hand():
    # abcdabcd: 4-grams abcd bcda cdab dabc abcd -> the last one repeats: 1 of 5.
    assert repeated_ngram_rate("abcdabcd") == 0.2
    # 哈哈哈哈哈 with n=2: 哈哈 four times, the last three repeat.
    assert repeated_ngram_rate("哈哈哈哈哈", 2) == 0.75
    assert repeated_ngram_rate("天地玄黄宇宙洪荒") == 0.0
    assert repeated_ngram_rate(["他", "说", "他", "说", "他", "说"], 2) == pytest.approx(3 / 5)


def test_empty_or_short_text_scores_zero():
    assert distinct_n("") == 0.0
    assert distinct_n(" \n", 2) == 0.0
    assert distinct_n([], 1) == 0.0
    assert corpus_distinct_n([]) == 0.0
    assert corpus_distinct_n(["", ""], 2) == 0.0
    assert repeated_ngram_rate("") == 0.0
    assert repeated_ngram_rate("我爱我") == 0.0  # shorter than n=4
