"""The benchmark registry: how each task loads, prompts, scores one answer and aggregates.

Scorers and aggregators read only the per-sample records (the lines of samples.jsonl), so predictions can
be re-scored from those files alone and merged across processes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError
from . import datasets, metrics
from .prompts import MMBENCH_TEMPLATE, QUESTION_ONLY_TEMPLATE, SCIENCEQA_TEMPLATE, SHORT_ANSWER_TEMPLATE


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable  # (path | None, split | None, BadRecords) -> datasets.Loaded
    score: Callable[[dict, str], dict]  # (record, normalize mode) -> {"score": 0..1, "parsed": ...}
    aggregate: Callable[[list[dict]], dict]  # scored records -> metrics
    headline: str  # the metric a sweep plots
    prompt_template: str = SHORT_ANSWER_TEMPLATE
    max_new_tokens: int = 16
    needs_data: bool = True
    # What --normalize changes for this task; None when the task has a single official answer handling.
    normalization: str | None = None


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _by(records: list[dict], key: str) -> dict[str, float]:
    groups = defaultdict(list)
    for r in records:
        if r["fields"].get(key) is not None:
            groups[str(r["fields"][key])].append(r["score"])
    return {name: _mean(scores) for name, scores in sorted(groups.items())}


# ---- per-task scoring ---------------------------------------------------------------------------------------

def _score_vqav2(record, mode):
    return {"score": metrics.vqa_accuracy(record["prediction"], record["references"], mode)}


def _score_textvqa(record, mode):
    return {"score": metrics.textvqa_accuracy(record["prediction"], record["references"])}


def _score_easyvqa(record, mode):
    return {"score": metrics.normalized_exact_match(record["prediction"], record["references"][0])}


def _score_gqa(record, mode):
    return {"score": metrics.gqa_match(record["prediction"], record["references"][0], mode)}


def _score_pope(record, mode):
    parsed = metrics.pope_parse(record["prediction"])
    return {"score": float(parsed == record["references"][0]), "parsed": parsed}


def _score_mme(record, mode):
    parsed = metrics.mme_parse(record["prediction"])
    return {"score": float(parsed == record["references"][0]), "parsed": parsed}


def _score_docvqa(record, mode):
    return {"score": metrics.anls(record["prediction"], record["references"])}


def _score_scienceqa(record, mode):
    parsed = metrics.scienceqa_choice(record["prediction"])
    return {"score": float(parsed == record["references"][0]), "parsed": parsed}


def _score_mmbench(record, mode):
    parsed = metrics.mmbench_choice(record["prediction"], record["fields"]["options"])
    return {"score": float(parsed == record["references"][0]), "parsed": parsed}


# ---- per-task aggregation -----------------------------------------------------------------------------------

def _agg_accuracy(records):
    return {"accuracy": _mean(r["score"] for r in records), "n": len(records)}


def _agg_easyvqa(records):
    by_type = _by(records, "answer_type")
    return {**_agg_accuracy(records), "accuracy_yes_no": by_type.get("yes/no", 0.0),
            "accuracy_other": by_type.get("other", 0.0)}


def _agg_scenevqa(records):
    return {**_agg_accuracy(records), "per_question_type": _by(records, "question_type")}


def _agg_vqav2(records):
    return {**_agg_accuracy(records), "per_answer_type": _by(records, "answer_type")}


def _agg_gqa(records):
    # The official script averages over balanced questions only.
    balanced = [r for r in records if r["fields"].get("is_balanced", True)]
    return {"accuracy": _mean(r["score"] for r in balanced), "n": len(balanced),
            "accuracy_all_questions": _mean(r["score"] for r in records), "n_all": len(records)}


def _agg_pope(records):
    splits = defaultdict(list)
    for r in records:
        splits[r["fields"]["category"]].append((r["parsed"], r["references"][0]))
    per_split = {name: metrics.pope_metrics(pairs) for name, pairs in sorted(splits.items())}
    overall = metrics.pope_metrics(pair for pairs in splits.values() for pair in pairs)
    return {**overall, "f1_mean_over_splits": _mean(s["f1"] for s in per_split.values()), "per_split": per_split}


def _agg_mme(records):
    return metrics.mme_scores((r["fields"]["category"], r["fields"]["image_key"], r["score"] == 1.0)
                              for r in records)


def _agg_docvqa(records):
    return {"anls": _mean(r["score"] for r in records), "n": len(records)}


def _agg_mmbench(records):
    accuracy, groups = metrics.circular_accuracy((r["fields"]["group"], r["score"] == 1.0) for r in records)
    firsts = {}
    for r in records:
        firsts.setdefault(r["fields"]["group"], r["fields"])

    def per(key):
        buckets = defaultdict(list)
        for group, correct in groups.items():
            if firsts[group].get(key) is not None:
                buckets[str(firsts[group][key])].append(correct)
        return {name: _mean(v) for name, v in sorted(buckets.items())}

    return {"circular_accuracy": accuracy, "n_questions": len(groups), "n_rows": len(records),
            "vanilla_accuracy": _mean(r["score"] for r in records),
            "per_category": per("category"), "per_l2_category": per("l2_category")}


TASKS: dict[str, Task] = {t.name: t for t in (
    # easy-VQA is no lmms-eval benchmark: the plain question, as the bundled demo model was trained on it.
    Task("easyvqa", datasets.load_easyvqa, _score_easyvqa, _agg_easyvqa, "accuracy", needs_data=False,
         prompt_template=QUESTION_ONLY_TEMPLATE,
         normalization="VQA answer normalisation always (single answer)"),
    # scene-VQA is generated (vismmoe/evaluation/scenevqa.py); the plain question, as the scene model was trained.
    Task("scenevqa", datasets.load_scenevqa, _score_easyvqa, _agg_scenevqa, "accuracy", needs_data=False,
         prompt_template=QUESTION_ONLY_TEMPLATE, max_new_tokens=12,
         normalization="VQA answer normalisation always (single answer)"),
    Task("vqav2", datasets.load_vqav2, _score_vqav2, _agg_vqav2, "accuracy",
         normalization="official: normalise only when the ten answers disagree; always: every time"),
    Task("textvqa", datasets.load_textvqa, _score_textvqa, _agg_accuracy, "accuracy",
         normalization="EvalAI answer processor always (TextVQA's official evaluator)"),
    Task("gqa", datasets.load_gqa, _score_gqa, _agg_gqa, "accuracy",
         normalization="official: raw match after LLaVA's strip/rstrip('.')/lower; always: lmms-eval "
                       "ignore-case ignore-punctuation"),
    Task("pope", datasets.load_pope, _score_pope, _agg_pope, "f1_mean_over_splits"),
    Task("mme", datasets.load_mme, _score_mme, _agg_mme, "perception"),
    Task("docvqa", datasets.load_docvqa, _score_docvqa, _agg_docvqa, "anls", max_new_tokens=32),
    Task("scienceqa", datasets.load_scienceqa, _score_scienceqa, _agg_accuracy, "accuracy",
         prompt_template=SCIENCEQA_TEMPLATE),
    Task("mmbench", datasets.load_mmbench, _score_mmbench, _agg_mmbench, "circular_accuracy",
         prompt_template=MMBENCH_TEMPLATE),
)}

_ALIASES = {"easy-vqa": "easyvqa", "easy_vqa": "easyvqa", "scienceqa-img": "scienceqa",
            "scienceqa_img": "scienceqa", "sqa": "scienceqa", "vqa-v2": "vqav2",
            "scene-vqa": "scenevqa", "scene_vqa": "scenevqa"}


def get_task(name: str) -> Task:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]
