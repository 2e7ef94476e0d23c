"""Turn samples and predictions into scored records and results; `score()` does it for a predictions file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .datasets import Loaded
from .errors import BadRecords, EvalDataError
from .metrics import NORMALIZE_MODES
from .outputs import efficiency, provenance, write_results
from .prompts import render
from .tasks import Task, get_task


def prepare_samples(task: Task, data, split, limit, prompt_template, bad: BadRecords,
                    need_images: bool = True) -> Loaded:
    """Load the task's samples, drop repeated ids, keep the first `limit`, render each prompt.

    With `need_images` (evaluation), local image files that do not exist are bad records up front;
    scoring reads no images and does not need them."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive integer (the number of questions), got {limit!r}")
    if task.needs_data and data is None:
        raise ConfigError(f"task {task.name} needs --data: the path of its local files")
    loaded = task.load(data, split, bad)
    seen, samples = set(), []
    for sample in loaded.samples:
        key = str(sample.question_id)
        if key in seen:
            bad.report(EvalDataError("question_id occurs more than once", file=", ".join(loaded.files),
                                     question_id=sample.question_id))
            continue
        missing = sample.image.missing() if need_images and sample.image is not None else None
        if missing is not None:
            bad.report(missing)
            continue
        seen.add(key)
        samples.append(sample)
    samples = samples[:limit] if limit is not None else samples
    template = prompt_template or task.prompt_template
    for sample in samples:
        sample.prompt = render(template, sample.prompt_fields)
    loaded.samples = samples
    return loaded


def base_record(sample) -> dict:
    return {"question_id": sample.question_id, "prompt": sample.prompt, "references": sample.references,
            "image": sample.image.describe if sample.image else None, "fields": sample.fields}


def check_mode(normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


def build_results(task: Task, loaded: Loaded, records: list[dict], *, data, normalize, prompt_template,
                  max_new_tokens, skipped: dict, device=None, **extra) -> dict:
    metrics = task.aggregate(records)
    return {
        "task": task.name, "split": loaded.split, "data": str(data) if data is not None else None,
        "data_files": loaded.files, "n_samples": len(records),
        "headline": {"name": task.headline, "value": metrics.get(task.headline)},
        "metrics": metrics,
        "normalize": {"mode": normalize, "applies": task.normalization or "not used by this task"},
        "prompt_template": prompt_template or task.prompt_template, "max_new_tokens": max_new_tokens,
        "efficiency": efficiency(records), "skipped": skipped, **extra,
        "provenance": provenance(device),
    }


def read_predictions(path: Path, bad: BadRecords) -> dict[str, str]:
    """{str(question_id): prediction} from JSONL lines {"question_id": ..., "prediction": "..."}."""
    path = Path(path)
    if not path.exists():
        raise EvalDataError("the predictions file does not exist", file=path)
    predictions: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise EvalDataError(f"not JSON ({exc})", file=path, record=f"line {number}") from None
            if not isinstance(item, dict) or "question_id" not in item or not isinstance(item.get("prediction"), str):
                raise EvalDataError('a line needs "question_id" and a string "prediction"',
                                    file=path, record=f"line {number}")
            key = str(item["question_id"])
            if key in predictions:
                raise EvalDataError("a second prediction for this question", file=path, record=f"line {number}",
                                    question_id=item["question_id"])
            predictions[key] = item["prediction"]
        except EvalDataError as error:
            bad.report(error)
    return predictions


def score(task: str, predictions, data=None, *, output=None, split=None, normalize: str = "official",
          skip_bad: bool = False, prompt_template: str | None = None) -> dict:
    """Score an existing predictions JSONL without a model; writes the same files as `run_eval` if `output`."""
    check_mode(normalize)
    spec = get_task(task)
    bad = BadRecords(skip_bad)
    loaded = prepare_samples(spec, data, split, None, prompt_template, bad, need_images=False)
    predicted = read_predictions(predictions, bad)
    known = {str(s.question_id) for s in loaded.samples}
    for key in predicted.keys() - known:
        bad.report(EvalDataError(f"prediction for a question that is not in the {loaded.split} split",
                                 file=predictions, question_id=key))
    records, missing = [], []
    for sample in loaded.samples:
        if str(sample.question_id) not in predicted:
            missing.append(sample.question_id)
            continue
        record = {**base_record(sample), "prediction": predicted[str(sample.question_id)]}
        record.update(spec.score(record, normalize))
        records.append(record)
    results = build_results(
        spec, loaded, records, data=data, normalize=normalize, prompt_template=prompt_template,
        max_new_tokens=None, skipped=bad.summary(), predictions=str(predictions),
        missing_predictions={"count": len(missing), "examples": missing[:20]},
    )
    if output is not None:
        write_results(Path(output), results, records)
    return results
