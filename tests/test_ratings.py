"""Preference pairs from the demo's blind A/B ratings (novelkit/evaluation/ratings.py): the chosen output is the one
the raters preferred, whatever side it was shown on; ties, even splits and repeats are handled and counted."""

import pytest

from novelkit.errors import ConfigError
from novelkit.evaluation.ratings import Rating, RatingStore, preference_pairs


def rate(store, prompt, a, b, winner, scores_a=(3, 3, 3), scores_b=(3, 3, 3), models=("base", "lora"), rater="li"):
    store.add(Rating(rater=rater, prompt=prompt, output_a=a, output_b=b, model_a=models[0], model_b=models[1],
                     scores_a=scores_a, scores_b=scores_b, winner=winner))


def test_pairs_follow_the_raters_choice_whatever_the_side(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    rate(store, "续写一", "甲稿", "乙稿", "A")
    rate(store, "续写二", "丙稿", "丁稿", "B", models=("lora", "base"))  # the demo shuffles the sides
    rate(store, "续写三", "戊稿", "己稿", "tie")
    pairs, counts = preference_pairs(store.rows())
    assert [(p["prompt"], p["chosen"], p["rejected"], p["chosen_model"]) for p in pairs] == [
        ("续写一", "甲稿", "乙稿", "base"), ("续写二", "丁稿", "丙稿", "base")]
    assert counts == {"ratings": 3, "ties": 1, "repeats": 0, "split": 0, "pairs": 2}


def test_repeated_ratings_are_one_pair_by_majority_and_even_splits_none(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    rate(store, "续写", "好稿", "差稿", "A", rater="li")
    rate(store, "续写", "差稿", "好稿", "B", models=("lora", "base"), rater="wang")  # the same pair, sides swapped
    rate(store, "续写", "好稿", "差稿", "B", rater="zhao")  # one dissent
    rate(store, "另一段", "X稿", "Y稿", "A")
    rate(store, "另一段", "X稿", "Y稿", "B")  # 1 : 1
    pairs, counts = preference_pairs(store.rows())
    assert [(p["chosen"], p["rejected"], p["votes"]) for p in pairs] == [("好稿", "差稿", [2, 1])]
    assert counts == {"ratings": 5, "ties": 0, "repeats": 3, "split": 1, "pairs": 1}


def test_pairs_by_one_axis_use_its_scores(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    rate(store, "续写", "文采好", "逻辑好", "B", scores_a=(2, 3, 5), scores_b=(5, 3, 2))
    assert preference_pairs(store.rows(), by="文风")[0][0]["chosen"] == "文采好"
    assert preference_pairs(store.rows(), by="逻辑性")[0][0]["chosen"] == "逻辑好"
    pairs, counts = preference_pairs(store.rows(), by="背景知识")  # 3 : 3 is a tie on that axis
    assert pairs == [] and counts["ties"] == 1
    with pytest.raises(ConfigError, match="one of 逻辑性, 背景知识, 文风"):
        preference_pairs(store.rows(), by="情节")
