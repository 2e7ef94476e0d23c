"""Metric unit tests: hand-worked cases from the official evaluation code's behaviour (research/eval.md)."""

import pytest

from vismmoe.evaluation import metrics as m
from vismmoe.evaluation.answer_normalization import (
    CONTRACTIONS, evalai_normalize, normalize_answer, normalize_words, strip_punctuation)


# ---- VQA answer normalisation -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2.", "2"),                      # periodStrip typo: every period not followed by a digit goes
    ("3.5", "3.5"),                   # ... but decimals stay
    ("100,978", "100978"),            # digit,digit: the comma is deleted, not replaced by a space
    ("red,white", "red white"),       # other commas become spaces
    ("1,000 (approx)", "1000 approx"),  # a digit,digit anywhere deletes *every* punctuation character
    ("x (approx)", "x approx "),      # "(" follows a space -> deleted; ")" does not -> a space
    ("hi !", "hi "),                  # next to a space in the original text -> deleted
    ("a-b", "a b"),
    ("it's 10:30", "it's 10:30"),     # ' and : are not in the punctuation list
    ("$5 & 10%", "$5 & 10%"),
])
def test_strip_punctuation(text, expected):
    assert strip_punctuation(text) == expected


def test_period_strip_removes_at_most_32_periods():
    # re.UNICODE (32) is passed positionally as `count` in the official code.
    assert strip_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("none", "0"), ("eleven", "eleven"), ("The Cat", "cat"), ("an apple a day", "apple day"),
    ("dont", "don't"), ("Im", "im"),  # the capitalised key "Im" can never match after lowercasing
    ("somebody'd", "somebodyd"),      # the one entry mapping the "wrong" way round
    ("  two   dogs ", "2 dogs"),
])
def test_normalize_words(text, expected):
    assert normalize_words(text) == expected


def test_contraction_table_is_complete():
    assert len(CONTRACTIONS) == 120


def test_evalai_processor_differs_from_vqav2_on_commas_and_possessives():
    assert normalize_answer("red,white") == "red white"
    assert evalai_normalize("red,white") == "redwhite"
    assert evalai_normalize("The man's hat?") == "man 's hat"
    assert evalai_normalize("Two") == "2"


# ---- VQA accuracy -------------------------------------------------------------------------------------------

def test_leave_one_out_closed_form_and_brute_force():
    for k in range(11):
        answers = ["x"] * k + ["y"] * (10 - k)
        closed_form = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
        subsets = [answers[:i] + answers[i + 1:] for i in range(10)]
        brute_force = sum(min(1, s.count("x") / 3) for s in subsets) / 10
        assert m.leave_one_out_accuracy("x", answers) == pytest.approx(closed_form) == pytest.approx(brute_force)
    assert [m.leave_one_out_accuracy("x", ["x"] * k + ["y"] * (10 - k)) for k in range(5)] == pytest.approx(
        [0.0, 0.3, 0.6, 0.9, 1.0])


def test_leave_one_out_drops_one_answer_by_position_not_by_value():
    # Dropping every copy of the held-out value would give (3*0 + 7*1)/10 = 0.7 instead of 0.9.
    assert m.leave_one_out_accuracy("a", ["a"] * 3 + ["b"] * 7) == pytest.approx(0.9)


def test_vqa_official_mode_normalises_only_when_answers_disagree():
    unanimous = ["Two"] * 10
    assert m.vqa_accuracy("two", unanimous, "official") == 0.0
    assert m.vqa_accuracy("Two", unanimous, "official") == 1.0
    assert m.vqa_accuracy(" Two\n", unanimous, "official") == 1.0  # whitespace is always cleaned
    assert m.vqa_accuracy("two", unanimous, "always") == 1.0
    assert m.vqa_accuracy("Yes.", ["yes"] * 3 + ["no"] * 7, "official") == pytest.approx(0.9)
    assert m.vqa_accuracy("two", ["2"] * 4 + ["3"] * 6, "official") == 1.0
    with pytest.raises(ValueError):
        m.vqa_accuracy("x", ["x"], "sometimes")


def test_textvqa_accuracy():
    assert m.textvqa_accuracy("redwhite", ["red,white"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert m.textvqa_accuracy("coca cola", ["Coca Cola"] * 10) == 1.0  # no unanimity gate
    assert m.textvqa_accuracy("man's hat", ["the man's hat"] * 2 + ["hat"] * 8) == pytest.approx(0.6)


def test_easyvqa_exact_match():
    assert m.normalized_exact_match("Yes.", "yes") == 1.0
    assert m.normalized_exact_match("a circle", "circle") == 1.0
    assert m.normalized_exact_match("circles", "circle") == 0.0


# ---- GQA ----------------------------------------------------------------------------------------------------

def test_gqa_match_modes():
    assert m.gqa_match(" Yes.", "yes", "official") == 1.0   # LLaVA's strip / rstrip('.') / lower
    assert m.gqa_match("tshirt", "t-shirt", "official") == 0.0  # then a raw comparison
    assert m.gqa_match("tshirt", "t-shirt", "always") == 1.0    # lmms-eval drops punctuation on both sides
    assert m.gqa_match("the left", "left", "always") == 0.0     # no article removal anywhere


# ---- POPE ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("yes", "yes"), ("No", "no"), ("no, there is not", "no"), ("No.", "no"),
    ("NO", "yes"),                    # only No / no / not count as no
    ("Not at all", "yes"),
    ("There is not a dog.", "no"),
    ("Yes. No dog.", "yes"),          # only the first sentence is read
    ("I don't know", "yes"),          # anything else is yes
    ("", "yes"),
])
def test_pope_parse(text, parsed):
    assert m.pope_parse(text) == parsed


def test_pope_metrics_and_predicted_yes_ratio():
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes"), ("yes", "yes")]
    got = m.pope_metrics(pairs)
    # TP=2 FP=1 TN=1 FN=1
    assert got == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                 "yes_ratio": 3 / 5, "n": 5})
    none_yes = m.pope_metrics([("no", "yes"), ("no", "no")])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["yes_ratio"] == 0.0


# ---- MME ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), (" no ", "no"), ("none", "no"), ("not sure", "no"), ("yesterday", "yes"),
    ("Yes, it is", "yes"), ("I think yes", "other"), ("", "other"),
])
def test_mme_parse(text, parsed):
    assert m.mme_parse(text) == parsed


def test_mme_scores_acc_plus_needs_both_questions_of_an_image():
    items = [("existence", "1", True), ("existence", "1", True), ("existence", "2", True),
             ("existence", "2", False), ("code_reasoning", "3", False), ("code_reasoning", "3", True)]
    got = m.mme_scores(items)
    assert got["subtasks"]["existence"]["acc"] == 0.75
    assert got["subtasks"]["existence"]["acc_plus"] == 0.5
    assert got["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert got["subtasks"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert (got["perception"], got["cognition"], got["total"]) == pytest.approx((125.0, 50.0, 175.0))


# ---- ANLS ---------------------------------------------------------------------------------------------------

def test_levenshtein():
    assert m.levenshtein("kitten", "sitting") == 3
    assert m.levenshtein("", "abc") == 3
    assert m.levenshtein("abc", "abc") == 0


def test_anls_threshold_is_strict():
    assert m.anls("abXY", ["abcd"]) == 0.0          # NL = 0.5 exactly scores 0 officially (lmms-eval: 0.5)
    assert m.anls("abcX", ["abcd"]) == pytest.approx(0.75)
    assert m.anls("  Hello   WORLD ", ["hello world"]) == 1.0  # case and extra spaces are ignored
    assert m.anls("1,000", ["$1,000", "1000"]) == pytest.approx(5 / 6)  # best answer wins
    assert m.anls("", [""]) == 1.0
    assert m.anls("xyz", ["abc"]) == 0.0


# ---- Multiple choice ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("b", "B"), (" C. elephant", "C"), ("The answer is A.", "A"),
    ("I think B", None), ("c. elephant", None), ("The answer is A. The answer is B.", None),
])
def test_scienceqa_choice(text, letter):
    assert m.scienceqa_choice(text) == letter


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("(C)", "C"), ("The answer is B.", "B"),
    ("A cat", "A"),          # a lone "A" token is read as the option letter
    ("dog", "A"),            # no letter: the one option whose text occurs in the answer
    ("A or B", None),        # two letters and no option text -> a miss
    ("cat or dog", None),
    ("I don't know", None),
])
def test_mmbench_choice(text, letter):
    assert m.mmbench_choice(text, {"A": "dog", "B": "cat", "C": "bird"}) == letter


def test_circular_accuracy_needs_every_rotation_right():
    items = [(1, True), (1, True), (1, True), (1, True), (2, True), (2, False), (3, False)]
    accuracy, groups = m.circular_accuracy(items)
    assert accuracy == pytest.approx(1 / 3)
    assert groups == {1: True, 2: False, 3: False}
