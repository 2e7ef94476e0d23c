"""One loader per benchmark: local files in their published layout -> a list of `Sample`s.

Every loader checks what scoring needs (columns, a non-empty answer list, an image reference) and
reports a bad record through `BadRecords`, which raises an `EvalDataError` naming the file and record,
or skips and counts the record when the user asked for that. Images are checked when they are loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import BadRecords, EvalDataError
from .prompts import format_options
from .sample import ImageRef, Sample, image_from_path
from .tables import Row, find_split, read_rows


@dataclass
class Loaded:
    samples: list[Sample]
    split: str
    files: list[str]


# ---- helpers -----------------------------------------------------------------------------------------------

def _is_blank(value: Any) -> bool:
    # Tables exported through pandas store missing hints/options as NaN or the string "nan".
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "nan")


def _answers(values: Any, where: dict) -> list[str]:
    answers = []
    for v in values or []:
        answers.append(v["answer"] if isinstance(v, dict) else v)
    answers = [a for a in answers if isinstance(a, str)]
    if not any(a.strip() for a in answers):
        raise EvalDataError("empty or missing answer list (test splits without answers cannot be scored here)",
                            **where)
    return answers


def _text(row: Row, column: str, where: dict) -> str:
    value = row.values.get(column)
    if not isinstance(value, str):
        raise EvalDataError(f"column {column!r} is {value!r}, expected a string", **where)
    return value


def _table_image(row: Row, qid: Any, column: str = "image") -> ImageRef:
    return ImageRef(row.lazy[column], f"{row.file}#{row.index}", file=row.file, record=row.index,
                    question_id=qid, base_dir=row.file.parent)


def _collect(rows: Iterable[Row], make: Callable[[Row], Sample], bad: BadRecords) -> list[Sample]:
    samples = []
    for row in rows:
        try:
            samples.append(make(row))
        except EvalDataError as error:
            bad.report(error)
    return samples


def _where(row: Row, qid: Any = None) -> dict:
    return {"file": row.file, "record": row.index, "question_id": qid}


def _table_task(path, split, preferred, required, make, bad) -> Loaded:
    split, files = find_split(Path(path), split, preferred)
    return Loaded(_collect(read_rows(files, required), make, bad), split, [str(f) for f in files])


# ---- easy-VQA (the installed easy-vqa package) -------------------------------------------------------------

def load_easyvqa(path, split, bad: BadRecords) -> Loaded:
    import easy_vqa

    split = split or "test"
    if split not in ("train", "test"):
        raise EvalDataError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    source = Path(easy_vqa.__file__).parent / "data" / split / "questions.json"
    samples = []
    for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        where = {"file": source, "record": index, "question_id": index}
        try:
            if image_id not in paths:
                raise EvalDataError(f"image {image_id} has no file in the package", **where)
            if not answer:
                raise EvalDataError("empty answer", **where)
            samples.append(Sample(
                question_id=index, question=question, references=[answer],
                image=image_from_path(paths[image_id], file=source, record=index, question_id=index),
                prompt_fields={"question": question},
                fields={"answer_type": "yes/no" if answer in ("yes", "no") else "other", "image_id": image_id},
            ))
        except EvalDataError as error:
            bad.report(error)
    return Loaded(samples, split, [str(source)])


# ---- scene-VQA (generated: vismmoe/evaluation/scenevqa.py) ------------------------------------------------

def load_scenevqa(path, split, bad: BadRecords) -> Loaded:
    from . import scenevqa

    split = split or "test"
    if split not in scenevqa.SPLITS:
        raise EvalDataError(f"scene-VQA has splits {', '.join(scenevqa.SPLITS)}, not {split!r}")
    samples = []
    for image_id, scene in enumerate(scenevqa.split_items(split)):
        for k, (qtype, question, answer) in enumerate(scene.questions):
            qid = f"{image_id}" if len(scene.questions) == 1 else f"{image_id}.{k}"
            samples.append(Sample(
                question_id=qid, question=question, references=[answer],
                # rendered when the model needs it (deterministic: the same pixels every time)
                image=ImageRef(lambda scene=scene: scenevqa.render(scene), f"scenevqa/{split}/{image_id}",
                               question_id=qid),
                prompt_fields={"question": question}, fields={"question_type": qtype, "image_id": image_id},
            ))
    return Loaded(samples, split, [f"generated: vismmoe.evaluation.scenevqa split {split!r}"])


# ---- VQAv2 (parquet / save_to_disk, or the official questions + annotations JSON pair) ---------------------

_VQA_QUESTIONS = re.compile(r"^v2_OpenEnded_mscoco_(?P<split>.+)_questions\.json$")


def load_vqav2(path, split, bad: BadRecords) -> Loaded:
    path = Path(path)
    question_files = sorted(f for f in ([path] if path.is_file() else path.glob("*.json")) if _VQA_QUESTIONS.match(f.name))
    if question_files:
        return _load_vqav2_json(question_files, split, bad)

    def make(row: Row) -> Sample:
        qid = row.values["question_id"]
        where = _where(row, qid)
        question = _text(row, "question", where)
        fields = {k: row.values[k] for k in ("answer_type", "question_type", "image_id") if k in row.values}
        return Sample(qid, question, _answers(row.values["answers"], where), _table_image(row, qid),
                      {"question": question}, fields)

    return _table_task(path, split, ("validation", "val"), ("question_id", "question", "answers", "image"), make, bad)


def _load_vqav2_json(question_files: list[Path], split, bad: BadRecords) -> Loaded:
    by_split = {_VQA_QUESTIONS.match(f.name)["split"]: f for f in question_files}
    if split is None and len(by_split) > 1:
        raise EvalDataError(f"several question files ({', '.join(sorted(by_split))}); choose one with --split",
                            file=question_files[0].parent)
    split = split or next(iter(by_split))
    if split not in by_split:
        raise EvalDataError(f"no split {split!r}; found {sorted(by_split)}", file=question_files[0].parent)
    questions_file = by_split[split]
    annotations_file = questions_file.with_name(f"v2_mscoco_{split}_annotations.json")
    if not annotations_file.is_file():
        raise EvalDataError("the annotations file that pairs with the questions file is missing "
                            "(test splits have none and are scored by the EvalAI server)", file=annotations_file)
    questions_json = _read_json(questions_file, "questions")
    annotations = {a.get("question_id"): a for a in _read_json(annotations_file, "annotations")["annotations"]}
    subtype = questions_json.get("data_subtype", split)
    image_dir = _coco_image_dir(questions_file.parent, subtype)
    samples = []
    for index, q in enumerate(questions_json["questions"]):
        qid = q.get("question_id")
        where = {"file": questions_file, "record": index, "question_id": qid}
        try:
            if not isinstance(q.get("question"), str) or "image_id" not in q:
                raise EvalDataError("a question record needs 'question', 'question_id' and 'image_id'", **where)
            if qid not in annotations:
                raise EvalDataError(f"no annotation for this question in {annotations_file}", **where)
            ann = annotations[qid]
            answers = _answers(ann.get("answers"), {"file": annotations_file, "record": None, "question_id": qid})
            # Existence is checked when images are needed (run_eval), not by `score`, which reads none.
            image = image_dir / f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
            fields = {k: ann[k] for k in ("answer_type", "question_type") if k in ann}
            fields["image_id"] = q["image_id"]
            samples.append(Sample(qid, q["question"], answers,
                                  image_from_path(image, file=questions_file, record=index, question_id=qid),
                                  {"question": q["question"]}, fields))
        except EvalDataError as error:
            bad.report(error)
    return Loaded(samples, split, [str(questions_file), str(annotations_file)])


def _read_json(file: Path, key: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise EvalDataError(f"cannot read JSON ({exc})", file=file) from exc
    if not isinstance(data, dict) or key not in data:
        raise EvalDataError(f"expected a JSON object with a {key!r} list", file=file)
    return data


def _coco_image_dir(root: Path, subtype: str) -> Path:
    # COCO images are usually unpacked as <root>/val2014/COCO_val2014_<id>.jpg; accept images/<subtype> and flat.
    for candidate in (root / subtype, root / "images" / subtype, root / "images", root):
        if candidate.is_dir() and any(candidate.glob(f"COCO_{subtype}_*.jpg")):
            return candidate
    return root / subtype


# ---- TextVQA -----------------------------------------------------------------------------------------------

def load_textvqa(path, split, bad: BadRecords) -> Loaded:
    def make(row: Row) -> Sample:
        qid = row.values["question_id"]
        where = _where(row, qid)
        question = _text(row, "question", where)
        ocr = row.values.get("ocr_tokens") or []
        return Sample(qid, question, _answers(row.values["answers"], where), _table_image(row, qid),
                      {"question": question, "ocr_tokens": ", ".join(ocr)},
                      {k: row.values[k] for k in ("image_id", "set_name") if k in row.values})

    return _table_task(path, split, ("validation", "val"), ("question_id", "question", "answers", "image"), make, bad)


# ---- GQA (the *_instructions table joined with its *_images table on imageId == id) ------------------------

def load_gqa(path, split, bad: BadRecords) -> Loaded:
    instructions_dir, images_dir = _gqa_dirs(Path(path))
    split, files = find_split(instructions_dir, split, ("testdev", "val"))
    images: dict[str, Row] = {}
    if images_dir is not None:
        _, image_files = find_split(images_dir, split, ())
        images = {row.values["id"]: row for row in read_rows(image_files, ("id", "image"))}

    def make(row: Row) -> Sample:
        qid = row.values["id"]
        where = _where(row, qid)
        question, answer = _text(row, "question", where), _text(row, "answer", where)
        if "image" in row.lazy:  # a table with images already joined
            image = _table_image(row, qid)
        elif row.values["imageId"] in images:
            image_row = images[row.values["imageId"]]
            image = _table_image(image_row, qid)
        else:
            raise EvalDataError(f"image {row.values['imageId']!r} is not in the images table {images_dir}", **where)
        fields = {"image_id": row.values["imageId"]}
        if "isBalanced" in row.values:
            fields["is_balanced"] = bool(row.values["isBalanced"])
        return Sample(qid, question, _answers([answer], where), image, {"question": question}, fields)

    samples = _collect(read_rows(files, ("id", "imageId", "question", "answer")), make, bad)
    return Loaded(samples, split, [str(f) for f in files] + ([str(images_dir)] if images_dir else []))


def _gqa_dirs(path: Path) -> tuple[Path, Path | None]:
    if path.name.endswith("_instructions"):
        instructions = path
    else:
        found = sorted(p for p in path.glob("*_instructions") if p.is_dir())
        if not found:
            return path, None  # a single table that already carries an image column
        by_name = {p.name: p for p in found}
        instructions = by_name.get("testdev_balanced_instructions") or (found[0] if len(found) == 1 else None)
        if instructions is None:
            raise EvalDataError(f"several GQA configs ({', '.join(by_name)}); point the data path at one", file=path)
    images = instructions.with_name(instructions.name[: -len("_instructions")] + "_images")
    if not images.is_dir():
        raise EvalDataError("the images table that pairs with the instructions table is missing", file=images)
    return instructions, images


# ---- POPE --------------------------------------------------------------------------------------------------

def load_pope(path, split, bad: BadRecords) -> Loaded:
    def make(row: Row) -> Sample:
        # question_id restarts in every category, so the id carries the category.
        category = row.values["category"]
        qid = f"{category}/{row.values['question_id']}"
        where = _where(row, qid)
        question = _text(row, "question", where)
        answer = _text(row, "answer", where).strip().lower()
        if answer not in ("yes", "no"):
            raise EvalDataError(f"answer must be yes or no, got {answer!r}", **where)
        return Sample(qid, question, [answer], _table_image(row, qid), {"question": question},
                      {"category": category})

    return _table_task(path, split, ("test",), ("question_id", "question", "answer", "image", "category"), make, bad)


# ---- MME ---------------------------------------------------------------------------------------------------

_MME_SUFFIX = " Please answer yes or no."


def load_mme(path, split, bad: BadRecords) -> Loaded:
    seen: dict[str, int] = {}

    def make(row: Row) -> Sample:
        # question_id is the image path, shared by the image's two questions: "<image>#0", "<image>#1".
        image_key = row.values["question_id"]
        qid = f"{image_key}#{seen.get(image_key, 0)}"
        seen[image_key] = seen.get(image_key, 0) + 1
        where = _where(row, qid)
        question = _text(row, "question", where)
        answer = _text(row, "answer", where).strip().lower()
        if answer not in ("yes", "no"):
            raise EvalDataError(f"answer must be Yes or No, got {answer!r}", **where)
        # lmms-eval replaces MME's own "Please answer yes or no." by the short-answer instruction.
        short = question[: -len(_MME_SUFFIX)] if question.endswith(_MME_SUFFIX) else question
        return Sample(qid, question, [answer], _table_image(row, qid),
                      {"question": short, "original_question": question},
                      {"category": row.values["category"], "image_key": image_key})

    return _table_task(path, split, ("test",), ("question_id", "question", "answer", "image", "category"), make, bad)


# ---- DocVQA ------------------------------------------------------------------------------------------------

def load_docvqa(path, split, bad: BadRecords) -> Loaded:
    def make(row: Row) -> Sample:
        qid = row.values["questionId"]
        where = _where(row, qid)
        question = _text(row, "question", where)
        fields = {k: row.values[k] for k in ("docId", "question_types") if k in row.values}
        return Sample(qid, question, _answers(row.values["answers"], where), _table_image(row, qid),
                      {"question": question}, fields)

    return _table_task(path, split, ("validation", "val"), ("questionId", "question", "answers", "image"), make, bad)


# ---- ScienceQA-IMG -----------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def load_scienceqa(path, split, bad: BadRecords) -> Loaded:
    def make(row: Row) -> Sample:
        qid = row.index  # the lmms-lab table has no id column; the row number is lmms-eval's doc_id
        where = _where(row, qid)
        question = _text(row, "question", where)
        choices, answer = row.values["choices"], row.values["answer"]
        if not choices or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvalDataError(f"answer {answer!r} is not an index into choices {choices!r}", **where)
        options = {_LETTERS[i]: str(c) for i, c in enumerate(choices)}
        hint = "" if _is_blank(row.values.get("hint")) else str(row.values["hint"])
        fields = {"options": options}
        fields.update({k: row.values[k] for k in ("subject", "category", "grade") if k in row.values})
        return Sample(qid, question, [_LETTERS[answer]], _table_image(row, qid),
                      {"question": question, "options": format_options(options),
                       "context": f"Context: {hint}\n" if hint else "", "hint": hint}, fields)

    return _table_task(path, split, ("test",), ("question", "choices", "answer", "image"), make, bad)


# ---- MMBench (rotated copies share index % 1e6) -------------------------------------------------------------

def load_mmbench(path, split, bad: BadRecords) -> Loaded:
    def make(row: Row) -> Sample:
        try:
            qid = int(row.values["index"])  # one published revision stores index as a string
        except (TypeError, ValueError):
            raise EvalDataError(f"index {row.values['index']!r} is not an integer", **_where(row)) from None
        where = _where(row, qid)
        question = _text(row, "question", where)
        options = {k: str(row.values[k]) for k in "ABCDEFGHI" if k in row.values and not _is_blank(row.values[k])}
        answer = row.values.get("answer")
        if _is_blank(answer):
            raise EvalDataError("no answer (test splits are scored by the MMBench server)", **where)
        if answer not in options:
            raise EvalDataError(f"answer {answer!r} is not one of the options {sorted(options)}", **where)
        hint = "" if _is_blank(row.values.get("hint")) else str(row.values["hint"])
        l2 = row.values.get("L2-category", row.values.get("l2-category"))
        return Sample(qid, question, [answer], _table_image(row, qid),
                      {"question": question, "options": format_options(options), "hint": f"{hint}\n" if hint else ""},
                      {"options": options, "group": qid % 1_000_000, "category": row.values.get("category"),
                       "l2_category": l2})

    return _table_task(path, split, ("dev",), ("index", "question", "answer", "image", "A", "B"), make, bad)
