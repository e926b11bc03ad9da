"""novelkit.evaluation.rouge: parity with rouge_chinese and rouge_score on real data, hand-computed cases, edge
cases."""

import random
import re
import time

import pytest
from rouge_chinese import Rouge
from rouge_score import rouge_scorer, tokenizers

from novelkit.evaluation.rouge import METRICS, corpus_rouge, lcs_length, rouge_scores, rouge_table, tokenize

TOLERANCE = 1e-9
ZERO = {metric: {"p": 0.0, "r": 0.0, "f": 0.0} for metric in METRICS}


class WhitespaceTokenizer(tokenizers.Tokenizer):
    """rouge_score's default tokenizer keeps only [a-z0-9]+ tokens, so it would drop every Chinese token."""

    def tokenize(self, text):
        return text.split()


RC_ROUGE = Rouge()
RS_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=WhitespaceTokenizer())


def rouge_chinese_says(hyp_tokens, ref_tokens):
    """rouge_chinese called as the seeds and LLaMA-Factory call it; it raises on empty input, which scores 0."""
    try:
        return RC_ROUGE.get_scores(" ".join(hyp_tokens), " ".join(ref_tokens))[0]
    except ValueError:
        return ZERO


def rouge_score_says(hyp_tokens, ref_tokens):
    scores = RS_SCORER.score(" ".join(ref_tokens), " ".join(hyp_tokens))  # (target, prediction)
    names = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}
    return {
        metric: {"p": scores[name].precision, "r": scores[name].recall, "f": scores[name].fmeasure}
        for metric, name in names.items()
    }


LIBRARIES = {"rouge-chinese": rouge_chinese_says, "standard": rouge_score_says}


def assert_scores_equal(ours, theirs, context=""):
    for metric in METRICS:
        for stat in "prf":
            assert abs(ours[metric][stat] - theirs[metric][stat]) <= TOLERANCE, (context, metric, stat)


def read_columns(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def shuffled_clauses(text, rng):
    """A model-like hypothesis: the text's clauses in a new order, the last third dropped."""
    clauses = [c for c in re.split(r"(?<=[，。！？；,])", text) if c]
    rng.shuffle(clauses)
    return "".join(clauses[: max(1, len(clauses) * 2 // 3)])


@pytest.fixture(scope="module")
def real_pairs(shared_data):
    """(hypothesis, reference) text pairs from CSL and LCSTS, sized so rouge_chinese's O(n*m) LCS stays quick."""
    rng = random.Random(0)
    lcsts = read_columns(shared_data / "lcsts" / "val.tsv")
    ts_dev = read_columns(shared_data / "csl" / "ts_dev.tsv")
    clge = read_columns(shared_data / "csl" / "clge_val.tsv")
    pairs = []
    pairs += [(title, text) for title, text in lcsts[:120]]
    pairs += [(text, title) for title, text in lcsts[120:240]]
    pairs += [(shuffled_clauses(text, rng), text) for _, text in lcsts[240:360]]
    pairs += [(lcsts[i][1], lcsts[i + 1][1]) for i in range(360, 420)]
    pairs += [(title, abstract) for _, abstract, title in ts_dev[:120]]
    pairs += [(title + "。" + abstract[: len(abstract) // 3], abstract) for _, abstract, title in ts_dev[120:160]]
    pairs += [(clge[i][1], clge[i + 1][1]) for i in range(30)]
    return pairs


@pytest.fixture(scope="module")
def real_token_pairs(real_pairs):
    return {level: [(tokenize(h, level), tokenize(r, level)) for h, r in real_pairs] for level in ("word", "char")}


@pytest.mark.parametrize("definition", ["rouge-chinese", "standard"])
@pytest.mark.parametrize("level", ["word", "char"])
def test_matches_reference_library_on_real_data(real_token_pairs, level, definition):
    token_pairs = real_token_pairs[level]
    assert len(token_pairs) > 500
    library = LIBRARIES[definition]
    for i, (hyp, ref) in enumerate(token_pairs):
        assert_scores_equal(rouge_scores(hyp, ref, definition), library(hyp, ref), f"pair {i}")


def test_real_data_scores_are_neither_trivial_nor_degenerate(real_token_pairs):
    # Guards the parity test against comparing only zeros or only identical texts.
    f_values = [rouge_scores(h, r)["rouge-l"]["f"] for h, r in real_token_pairs["char"]]
    assert sum(0.05 < f < 0.95 for f in f_values) > len(f_values) // 2


QUIRKY_PIECES = ["a", "b", "好", "。", "！", "？", "?", "”", "’", "…", "......", ".", "，", " ", "\n", "\r", "\u3000", ""]


def test_matches_reference_libraries_on_punctuation_and_whitespace_quirks():
    """Random tokens built from sentence-ending marks, quotes and whitespace exercise rouge_chinese's cut_sent:
    it splits tokens like "a?b", keeps "。。x" as "。" + "。x", and turns whitespace-only sentences into empty words."""
    rng = random.Random(1)

    def random_tokens():
        return ["".join(rng.choices(QUIRKY_PIECES, k=rng.randint(1, 3))) for _ in range(rng.randint(0, 8))]

    for i in range(3000):
        hyp, ref = random_tokens(), random_tokens()
        for definition, library in LIBRARIES.items():
            assert_scores_equal(rouge_scores(hyp, ref, definition), library(hyp, ref), (i, hyp, ref, definition))


def test_unique_versus_counted_ngrams_by_hand():
    hyp, ref = ["a", "a", "b"], ["a", "b", "b"]
    # rouge-chinese: unigram sets {a, b} and {a, b}; bigram sets {aa, ab} and {ab, bb}; LCS "ab".
    chinese = rouge_scores(hyp, ref, "rouge-chinese")
    assert chinese["rouge-1"] == {"p": 1.0, "r": 1.0, "f": 2.0 * (1.0 / (2.0 + 1e-8))}
    assert chinese["rouge-2"] == {"p": 0.5, "r": 0.5, "f": 2.0 * (0.25 / (1.0 + 1e-8))}
    assert chinese["rouge-l"]["p"] == chinese["rouge-l"]["r"] == 2 / 3
    assert chinese["rouge-l"]["f"] == pytest.approx(2 / 3, abs=1e-8)
    # standard: a is clipped to 1 match and b to 1, so 2 of 3 unigrams match on each side.
    standard = rouge_scores(hyp, ref, "standard")
    assert standard["rouge-1"] == pytest.approx({"p": 2 / 3, "r": 2 / 3, "f": 2 / 3}, abs=1e-15)
    assert standard["rouge-2"] == pytest.approx({"p": 0.5, "r": 0.5, "f": 0.5}, abs=1e-15)
    assert standard["rouge-l"] == pytest.approx({"p": 2 / 3, "r": 2 / 3, "f": 2 / 3}, abs=1e-15)


def test_rouge_chinese_sentence_cut_splits_a_token():
    # cut_sent puts a newline after "?" when a non-quote follows, so "a?b" scores as the words "a?" and "b".
    chinese = rouge_scores(["a?b"], ["b"], "rouge-chinese")
    assert (chinese["rouge-1"]["p"], chinese["rouge-1"]["r"]) == (0.5, 1.0)
    assert chinese["rouge-l"]["p"] == 0.5
    assert rouge_scores(["a?b"], ["b"], "standard") == ZERO


@pytest.mark.parametrize("definition", ["rouge-chinese", "standard"])
def test_empty_prediction_or_reference_scores_zero(definition):
    assert rouge_scores([], ["我", "们"], definition) == ZERO
    assert rouge_scores(["我", "们"], [], definition) == ZERO
    assert rouge_scores([" ", "", "\n"], ["我"], definition) == ZERO
    assert rouge_scores([], [], definition) == ZERO


def test_single_token_has_no_bigrams():
    for definition in ("rouge-chinese", "standard"):
        scores = rouge_scores(["我"], ["我"], definition)
        assert scores["rouge-2"] == ZERO["rouge-2"]
        assert scores["rouge-1"]["p"] == scores["rouge-1"]["r"] == 1.0


def simple_lcs_length(a, b):
    """Textbook O(len(a) * len(b)) dynamic programme, two rows at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_lcs_length_small_cases():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == lcs_length(["a"], []) == 0
    assert lcs_length(["我们", "的"], ["的", "我们"]) == 1
    rng = random.Random(2)
    # Lengths around 30, 60 and 64 bits cross the boundaries of Python's int digits.
    for length in [1, 2, 29, 30, 31, 59, 60, 61, 63, 64, 65, 100, 129]:
        a = rng.choices("abcd", k=length)
        b = rng.choices("abcde", k=rng.randint(1, 140))
        assert lcs_length(a, b) == lcs_length(b, a) == simple_lcs_length(a, b)


def test_5000_token_pair_is_fast_and_exact():
    rng = random.Random(3)
    vocabulary = [f"词{i}" for i in range(300)]
    ref = rng.choices(vocabulary, k=5000)
    # A hypothesis that edits 30% of the reference's tokens: a long, non-trivial LCS.
    hyp = [rng.choice(vocabulary) if rng.random() < 0.3 else token for token in ref]
    start = time.perf_counter()
    chinese = rouge_scores(hyp, ref, "rouge-chinese")
    standard = rouge_scores(hyp, ref, "standard")
    assert time.perf_counter() - start < 2.0
    expected_lcs = simple_lcs_length(hyp, ref)
    assert 3500 < expected_lcs < 5000
    for scores in (chinese, standard):
        assert scores["rouge-l"]["p"] == scores["rouge-l"]["r"] == expected_lcs / 5000
    assert standard["rouge-l"]["f"] == pytest.approx(expected_lcs / 5000, abs=1e-12)
    assert chinese["rouge-1"]["r"] == len(set(hyp) & set(ref)) / len(set(ref))


def test_scoring_is_not_quadratic_in_python():
    # 200 pairs of 800 characters: bit-parallel LCS takes well under a second; a pure-Python DP over
    # 640,000 cells a pair would take about a minute.
    rng = random.Random(4)
    alphabet = [chr(0x4E00 + i) for i in range(400)]
    pairs = []
    for _ in range(200):
        ref = rng.choices(alphabet, k=800)
        pairs.append(([c if rng.random() < 0.7 else rng.choice(alphabet) for c in ref], ref))
    start = time.perf_counter()
    for hyp, ref in pairs:
        rouge_scores(hyp, ref, "rouge-chinese")
        rouge_scores(hyp, ref, "standard")
    assert time.perf_counter() - start < 3.0


def test_tokenize_levels():
    text = "我爱北京天安门。\n  Hello world，你好！\u3000"
    words = tokenize(text)
    assert "北京" in words and "Hello" in words
    assert all(token.strip() for token in words)
    assert "".join(words) == re.sub(r"\s", "", text)
    assert tokenize(text, "char") == list(re.sub(r"\s", "", text))
    assert tokenize("", "word") == tokenize(" \n", "char") == []
    with pytest.raises(ValueError, match="level"):
        tokenize(text, "subword")


def test_unknown_definition_is_refused():
    with pytest.raises(ValueError, match="definition"):
        rouge_scores(["a"], ["a"], "rouge-1.5.5")


@pytest.mark.parametrize("definition", ["rouge-chinese", "standard"])
def test_corpus_rouge_is_the_mean_over_pairs(definition):
    hyps = ["今天天气很好", "", "我们去公园散步吧"]
    refs = ["今天天气不错", "什么都没有", "我们一起去公园"]
    for level in ("word", "char"):
        per_pair = [rouge_scores(tokenize(h, level), tokenize(r, level), definition) for h, r in zip(hyps, refs)]
        corpus = corpus_rouge(hyps, refs, level=level, definition=definition)
        for metric in METRICS:
            for stat in "prf":
                expected = sum(scores[metric][stat] for scores in per_pair) / 3
                assert corpus[metric][stat] == pytest.approx(expected, abs=1e-15)
        assert 0 < corpus["rouge-1"]["f"] < 1


def test_corpus_rouge_refuses_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypothesis"):
        corpus_rouge([], [])


def test_rouge_table():
    metrics = {
        "rouge-1": {"p": 0.5, "r": 0.25, "f": 1 / 3},
        "rouge-2": {"p": 0.0, "r": 0.0, "f": 0.0},
        "rouge-l": {"p": 1.0, "r": 0.123456, "f": 0.2197802},
    }
    assert rouge_table(metrics) == (
        "| metric | P | R | F |\n"
        "|---|---:|---:|---:|\n"
        "| rouge-1 | 50.00 | 25.00 | 33.33 |\n"
        "| rouge-2 | 0.00 | 0.00 | 0.00 |\n"
        "| rouge-l | 100.00 | 12.35 | 21.98 |"
    )


def test_rouge_l_f_is_the_standard_definitions_rouge_l():
    from novelkit.evaluation.rouge import rouge_l_f, rouge_scores

    for hyp, ref in (("天气很好今天", "今天天气很好"), ("ab", "abc"), ("xyz", "abc")):
        expected = rouge_scores(list(hyp), list(ref), "standard")["rouge-l"]["f"]
        assert abs(rouge_l_f(list(hyp), list(ref)) - expected) < 1e-12
    assert rouge_l_f([], ["a"]) == 0.0
