"""Metrics against hand-computed cases."""

import math

import pytest

from omnifuse.eval.metrics import (accuracy_by_type, answer_change_rate, bleu, chair, exact_match,
                                   normalize_answer, parse_mentions, perplexity, pope_metrics, pope_reads_yes)

SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLORS = ["red", "green", "blue", "yellow", "purple"]


@pytest.mark.parametrize("pred, ref", [
    ("two", "2"), ("Two.", "2"), ("The Red.", "red"), ("  a   BLUE square ", "blue square"),
    ("twenty", "20"), ("zero", "0"), ("yes!", "yes"), ("An apple", "apple"),
])
def test_exact_match_equal(pred, ref):
    assert exact_match(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("red", "blue"), ("2", "3"), ("twenty one", "21"), ("left", "left of"), ("", "red"),
])
def test_exact_match_different(pred, ref):
    assert not exact_match(pred, ref)


def test_normalize_keeps_inner_punctuation():
    assert normalize_answer("3.5.") == "3.5"
    assert normalize_answer("the theme") == "theme"  # articles are whole words only
    assert normalize_answer(None) == ""


def test_accuracy_by_type():
    recs = [{"qtype": "color", "correct": True}, {"qtype": "color", "correct": False},
            {"qtype": "count", "correct": True}, {"qtype": "color", "correct": True}]
    out = accuracy_by_type(recs)
    assert out["overall"] == {"accuracy": 0.75, "correct": 3.0, "n": 4}
    assert out["by_type"]["color"]["accuracy"] == pytest.approx(2 / 3)
    assert out["by_type"]["count"] == {"accuracy": 1.0, "correct": 1.0, "n": 1}
    assert math.isnan(accuracy_by_type([])["overall"]["accuracy"])


@pytest.mark.parametrize("answer, is_yes, parsed", [
    ("yes", True, True), ("Yes.", True, True), ("yes, there is", True, True),
    ("no", False, True), ("No.", False, True), ("No, there is not.", False, True),
    ("There is no red circle in the image.", False, True), ("I do not see one", False, True),
    ("Yes. But not a big one.", True, True),       # only the first sentence counts
    ("I cannot tell", True, False), ("", True, False), ("nope", True, False),  # neither: yes by default
    ("NO", True, False), ("no!", True, False),     # the reference's words are exact: No, no, not
])
def test_pope_reads_answers_as_the_reference(answer, is_yes, parsed):
    """POPE's evaluate.py: first sentence, commas removed, split on spaces; 'No'/'no'/'not' -> no,
    anything else -> yes."""
    assert pope_reads_yes(answer) == (is_yes, parsed)


def test_pope_confusion_table():
    # read as: yes yes yes yes yes(unparsed) no no no yes(unparsed) no
    preds = ["Yes.", "yes, there is", "yes", "yes", "maybe", "no", "No.", "There is not.", "I cannot tell", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "yes"]
    m = pope_metrics(preds, labels)
    # TP = 3, FP = 3 ("yes" and the two unparsed on "no" labels), TN = 3, FN = 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 3, 3, 1)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(3 / 6)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.75 / (0.5 + 0.75))
    assert m["yes_ratio"] == pytest.approx(6 / 10)
    assert m["n"] == 10 and m["unparsed"] == 2


def test_pope_rejects_bad_labels():
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])


def test_chair_known_hallucination():
    scene = [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}]
    m = chair(["a red circle and a green star."], [scene], SHAPES, COLORS)
    assert m["chair_i"] == 0.5 and m["chair_s"] == 1.0 and m["recall"] == 0.5
    assert (m["n_mentioned"], m["n_hallucinated"]) == (2, 1)


def test_chair_two_captions_plurals_and_shape_only():
    scene_a = [{"shape": "circle", "color": "red"}, {"shape": "circle", "color": "red"},
               {"shape": "square", "color": "blue"}]
    scene_b = [{"shape": "triangle", "color": "green", "size": "big"}]
    captions = ["two big red circles and a small blue square.",   # 2 mentions, 0 hallucinated
                "a big green triangle, a cross and a red triangle"]  # 3 mentions, 2 hallucinated
    m = chair(captions, [scene_a, scene_b], SHAPES, COLORS)
    assert m["n_mentioned"] == 5 and m["n_hallucinated"] == 2
    assert m["chair_i"] == pytest.approx(2 / 5)
    assert m["chair_s"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(4 / 4)


def test_parse_mentions_rules():
    assert parse_mentions("a big red circle and a small blue square.", SHAPES, COLORS) == [
        ("red", "circle"), ("blue", "square")]
    # a shape with no colour directly before it is a shape-only mention; repeats count once
    assert parse_mentions("red big circle, circles", SHAPES, COLORS) == [(None, "circle")]
    assert parse_mentions("crimson ball and nothing else", SHAPES, COLORS,
                          synonyms={"ball": "circle", "crimson": "red"}) == [("red", "circle")]
    assert parse_mentions("two blue boxes", ["box"], COLORS) == [("blue", "box")]


def test_chair_empty_is_nan():
    m = chair(["nothing here"], [[]], SHAPES, COLORS)
    assert math.isnan(m["chair_i"]) and math.isnan(m["recall"]) and m["chair_s"] == 0.0


def test_bleu():
    assert bleu(["a red circle and a blue square."], ["A red circle and a blue square"]) < 1.0  # extra "."
    assert bleu(["a red circle and a blue square ."], ["a red circle and a blue square."]) == pytest.approx(1.0)
    assert bleu(["a red circle and a blue square"], [["a green star", "a red circle and a blue square"]]) \
        == pytest.approx(1.0)
    assert 0.0 < bleu(["a red circle and a green square"], ["a red circle and a blue square"]) < 1.0
    assert bleu([""], ["a red circle"]) == 0.0


def test_perplexity():
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_answer_change_rate():
    refs_o = ["red", "blue", "2", "square"]
    refs_s = ["blue", "blue", "three", "circle"]  # pair 1 is not eligible (same answer)
    preds_o = ["red", "blue", "2", "square"]
    preds_s = ["blue", "red", "4", "square"]      # changed right, (skip), changed wrong, unchanged
    m = answer_change_rate(preds_o, preds_s, refs_o, refs_s)
    assert m["n_pairs"] == 3 and m["n_total"] == 4
    assert m["change_rate"] == pytest.approx(2 / 3)
    assert m["correct_change_rate"] == pytest.approx(1 / 3)
