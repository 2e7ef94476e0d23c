"""Malformed data: a clear EvalDataError naming the file and record, or, with skip_bad, skipped and counted."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vismmoe.errors import ConfigError
from vismmoe.evaluation import EvalDataError, score
from vismmoe.evaluation.errors import BadRecords
from vismmoe.evaluation.scoring import prepare_samples
from vismmoe.evaluation.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def copy_fixture(tmp_path, *parts) -> Path:
    target = tmp_path / parts[-1]
    shutil.copytree(FIXTURES.joinpath(*parts), target)
    return target


def load(task, data, skip_bad=False, split=None):
    bad = BadRecords(skip_bad)
    return prepare_samples(get_task(task), data, split, None, None, bad), bad


def rewrite_rows(file: Path, edit) -> None:
    table = pq.read_table(file)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file)


def test_missing_column_names_the_file_and_the_column(tmp_path):
    data = copy_fixture(tmp_path, "pope")
    file = data / "data" / "test-00000-of-00001.parquet"
    pq.write_table(pq.read_table(file).drop_columns(["category"]), file)
    with pytest.raises(EvalDataError, match=r"test-00000-of-00001\.parquet.*missing column\(s\) \['category'\]"):
        load("pope", data)


def test_missing_annotations_file_is_named(tmp_path):
    data = copy_fixture(tmp_path, "vqav2", "official")
    (data / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(EvalDataError, match=r"v2_mscoco_val2014_annotations\.json"):
        load("vqav2", data)


def test_missing_image_file_raises_or_is_skipped(tmp_path):
    data = copy_fixture(tmp_path, "vqav2", "official")
    (data / "val2014" / "COCO_val2014_000000000001.jpg").unlink()  # used by questions 1 and 2
    with pytest.raises(EvalDataError, match=r"questions\.json, record 0, question_id 1: image file .*000000000001\.jpg"):
        load("vqav2", data)
    loaded, bad = load("vqav2", data, skip_bad=True)
    assert [s.question_id for s in loaded.samples] == [3, 4]
    assert bad.summary()["count"] == 2


def test_empty_answer_list_names_the_record(tmp_path):
    data = copy_fixture(tmp_path, "vqav2", "parquet")
    file = data / "data" / "validation-00000-of-00001.parquet"
    rewrite_rows(file, lambda rows: rows[2].update(answers=[]))
    with pytest.raises(EvalDataError, match=r"validation-00000-of-00001\.parquet, record 2, question_id 3: empty"):
        load("vqav2", data)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"question_id": q, "prediction": "two"}) + "\n" for q in (1, 2, 4)))
    results = score("vqav2", preds, data, skip_bad=True, output=tmp_path / "out")
    assert results["skipped"]["count"] == 1 and results["n_samples"] == 3
    assert "record 2" in results["skipped"]["examples"][0]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped"]["count"] == 1


def test_null_image_in_a_table_fails_when_loaded(tmp_path):
    data = copy_fixture(tmp_path, "docvqa")
    rewrite_rows(data / "DocVQA" / "validation-00000-of-00001.parquet", lambda rows: rows[1].update(image=None))
    loaded, _ = load("docvqa", data)
    assert loaded.samples[0].image.load().size == (4, 4)
    with pytest.raises(EvalDataError, match=r"record 1, question_id 'd2': the image is missing"):
        loaded.samples[1].image.load()


def test_duplicate_question_ids(tmp_path):
    data = copy_fixture(tmp_path, "docvqa")
    rewrite_rows(data / "DocVQA" / "validation-00000-of-00001.parquet", lambda rows: rows[2].update(questionId="d1"))
    with pytest.raises(EvalDataError, match="question_id 'd1': question_id occurs more than once"):
        load("docvqa", data)
    loaded, bad = load("docvqa", data, skip_bad=True)
    assert len(loaded.samples) == 2 and bad.summary()["count"] == 1


def test_bad_prediction_lines_name_the_line(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"question_id": "d1", "prediction": "1000"}\nnot json\n{"question_id": "d2"}\n'
                     '{"question_id": "zz", "prediction": "x"}\n')
    with pytest.raises(EvalDataError, match=r"p\.jsonl, record line 2: not JSON"):
        score("docvqa", preds, FIXTURES / "docvqa")
    results = score("docvqa", preds, FIXTURES / "docvqa", skip_bad=True)
    assert results["skipped"]["count"] == 3  # bad JSON, no prediction, unknown question id
    assert results["n_samples"] == 1 and results["missing_predictions"]["count"] == 2


def test_missing_data_path_split_and_task_errors(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        load("pope", tmp_path / "nowhere")
    with pytest.raises(EvalDataError, match=r"no split 'train'; found splits \['test'\]"):
        load("pope", FIXTURES / "pope", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="no .parquet files"):
        load("pope", tmp_path / "empty")
    with pytest.raises(ConfigError, match="needs --data"):
        load("pope", None)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("vqa3")


def test_multiple_splits_need_a_choice(tmp_path):
    data = copy_fixture(tmp_path, "pope")
    shutil.copy(data / "data" / "test-00000-of-00001.parquet", data / "data" / "extra-00000-of-00001.parquet")
    loaded, _ = load("pope", data)  # "test" is the preferred split
    assert loaded.split == "test"
    (data / "data" / "test-00000-of-00001.parquet").rename(data / "data" / "other-00000-of-00001.parquet")
    with pytest.raises(EvalDataError, match="several splits found .*choose one with --split"):
        load("pope", data)
