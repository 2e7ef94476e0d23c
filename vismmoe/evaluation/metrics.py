"""Benchmark metrics as pure functions, written from the official evaluation code's behaviour.

Each function scores one question (or aggregates already-scored questions); none needs torch or the data
files, so `vismmoe score` can score predictions made by any engine. research/eval.md §2 documents the
official definitions and the quirks reproduced here.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from .answer_normalization import clean_whitespace, evalai_normalize, normalize_answer

NORMALIZE_MODES = ("official", "always")


# ---- VQA accuracy (VQAv2, TextVQA, easy-VQA) --------------------------------------------------------------

def leave_one_out_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the leave-one-annotator-out subsets of min(#matches / 3, 1).

    Each subset drops one answer *by position*, so with k matches among 10 answers the score is
    (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10: k=1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    """
    k = sum(a == prediction for a in answers)
    return sum(min(1.0, (k - (a == prediction)) / 3) for a in answers) / len(answers)


def vqa_accuracy(prediction: str, answers: list[str], mode: str = "official") -> float:
    """VQAv2 accuracy.

    mode "official": like vqaEval.py, normalise answers and prediction only when the ground-truth answers
    disagree (a prediction differing from unanimous answers only in case or punctuation scores 0).
    mode "always": normalise every time, as lmms-eval (since PR #794) and VLMEvalKit do.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    answers = [clean_whitespace(a) for a in answers]
    prediction = clean_whitespace(prediction)
    if mode == "always" or len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    return leave_one_out_accuracy(prediction, answers)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA accuracy (mmf TextVQAAccuracyEvaluator): EvalAI processor on everything, no unanimity gate."""
    return leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def normalized_exact_match(prediction: str, answer: str) -> float:
    """Single-answer VQA (easy-VQA): exact match after the full VQA normalisation of both sides."""
    return float(normalize_answer(clean_whitespace(prediction)) == normalize_answer(clean_whitespace(answer)))


# ---- GQA ---------------------------------------------------------------------------------------------------

_ASCII_PUNCTUATION = re.compile(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")


def gqa_match(prediction: str, answer: str, mode: str = "official") -> float:
    """GQA exact match.

    "official": the GQA eval.py compares raw strings; predictions are first converted the way LLaVA's
    convert_gqa_for_eval.py prepares submissions (strip, drop trailing periods, lowercase).
    "always": lmms-eval's exact_match with ignore_case and ignore_punctuation on both sides.
    """
    if mode == "official":
        return float(prediction.strip().rstrip(".").lower() == answer)
    if mode == "always":
        def simplify(s: str) -> str:
            return _ASCII_PUNCTUATION.sub("", s.lower()).strip()
        return float(simplify(prediction) == simplify(answer))
    raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")


# ---- POPE --------------------------------------------------------------------------------------------------

def pope_parse(text: str) -> str:
    """The official POPE answer parser: first sentence, commas removed, split on single spaces;
    "no" if any word is exactly "No", "no" or "not", otherwise "yes" (so "NO", "Not" and "" count as yes)."""
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict:
    """Accuracy, precision, recall, F1 (positive class "yes") and the *predicted* yes-ratio.

    `pairs` are (parsed prediction, ground truth). Empty denominators give 0 rather than an error.
    """
    tp = fp = tn = fn = 0
    for pred, gold in pairs:
        if pred == "yes":
            tp, fp = (tp + 1, fp) if gold == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if gold == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0, "n": n,
    }


# ---- MME ---------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME's calculation.py parser: "yes"/"no" exactly, else "yes" or "no" within the first four characters
    (so "none" and "not sure" parse as "no"), else "other" (always wrong)."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_scores(items: Iterable[tuple[str, str, bool]]) -> dict:
    """MME totals from (category, image key, correct) triples.

    Per subtask: acc = fraction of questions right, acc_plus = fraction of images with all (both) of their
    questions right, score = 100*acc + 100*acc_plus (max 200). Perception sums the 10 perception subtasks
    (max 2000), cognition the 4 cognition subtasks (max 800).
    """
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image, correct in items:
        per_image[category][image].append(bool(correct))
    subtasks = {}
    for category, images in sorted(per_image.items()):
        answers = [c for results in images.values() for c in results]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(r) for r in images.values()) / len(images)
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                              "questions": len(answers), "images": len(images)}
    perception = sum(s["score"] for c, s in subtasks.items() if c in MME_PERCEPTION)
    cognition = sum(s["score"] for c, s in subtasks.items() if c in MME_COGNITION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "subtasks": subtasks}


# ---- ANLS (DocVQA) -----------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question, the official (ST-VQA/DocVQA) rule.

    Case and extra spaces are ignored; NL = edit distance / length of the longer normalised string;
    an answer scores 1 - NL if NL < threshold, else 0 (so NL == 0.5 scores 0, where lmms-eval gives 0.5).
    The question scores the best over its answers.
    """
    def simplify(s: str) -> str:
        return " ".join(s.strip().lower().split())

    pred = simplify(prediction)
    best = 0.0
    for answer in answers:
        gold = simplify(answer)
        longest = max(len(gold), len(pred))
        nl = levenshtein(gold, pred) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ---- Multiple choice (ScienceQA-IMG, MMBench) --------------------------------------------------------------

_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(text: str) -> str | None:
    """The option letter in a ScienceQA answer, or None (counted wrong).

    Accepted, as lmms-eval and LLaVA's eval_science_qa.py accept them: the letter alone (any case),
    "B. text" (an uppercase letter then a period), or exactly one "The answer is B." in the text.
    """
    text = text.strip()
    if len(text) == 1 and text.isalpha():
        return text.upper()
    if len(text) >= 2 and text[0] in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" and text[1] == ".":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


_MMBENCH_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")


def mmbench_choice(text: str, options: dict[str, str]) -> str | None:
    """The option an MMBench answer picks, by VLMEvalKit's `can_infer` heuristic, or None (a miss).

    First: exactly one option letter appears as a token (after turning .()[],:;!*#{} into spaces).
    Otherwise: exactly one option's text occurs in the answer (case-insensitive). No LLM judge is used.
    """
    tokens = _MMBENCH_SEPARATORS.sub(" ", text).split()
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    lowered = text.lower()
    matches = [letter for letter, option in options.items() if str(option).lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def circular_accuracy(items: Iterable[tuple[object, bool]]) -> tuple[float, dict]:
    """CircularEval: a question counts as right only if every rotated copy of it is right.

    `items` are (group id, correct) for each copy; returns (accuracy over groups, {group: correct}).
    """
    groups: dict[object, bool] = {}
    for group, correct in items:
        groups[group] = groups.get(group, True) and bool(correct)
    accuracy = sum(groups.values()) / len(groups) if groups else 0.0
    return accuracy, groups
