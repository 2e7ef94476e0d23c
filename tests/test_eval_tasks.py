"""Every task on its fixture (tests/fixtures/eval/<task>, published layouts), scored from hand-worked predictions."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vismmoe.evaluation import score
from vismmoe.evaluation.cli import main as eval_cli
from vismmoe.evaluation.errors import BadRecords
from vismmoe.evaluation.scoring import prepare_samples
from vismmoe.evaluation.tables import read_rows
from vismmoe.evaluation.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def write_predictions(path: Path, predictions: dict) -> Path:
    path.write_text("".join(json.dumps({"question_id": k, "prediction": v}) + "\n" for k, v in predictions.items()))
    return path


def score_fixture(tmp_path, task, data, predictions, **kwargs):
    return score(task, write_predictions(tmp_path / "p.jsonl", predictions), data, output=tmp_path / "out", **kwargs)


VQAV2_PREDICTIONS = {1: "two", 2: "Yes.", 3: "red", 4: "two"}


@pytest.mark.parametrize("layout", ["official", "parquet"])
def test_vqav2_both_layouts_and_normalize_modes(tmp_path, layout):
    data = FIXTURES / "vqav2" / layout
    official = score_fixture(tmp_path, "vqav2", data, VQAV2_PREDICTIONS)
    # q1 unanimous "Two" vs "two": 0 officially; q2 3 of 10 "yes": 0.9; q3 1 of 10: 0.3; q4 "two"->"2", 4 of 10: 1
    assert official["metrics"]["accuracy"] == pytest.approx((0 + 0.9 + 0.3 + 1) / 4)
    assert official["metrics"]["per_answer_type"] == pytest.approx({"number": 0.5, "other": 0.3, "yes/no": 0.9})
    assert official["normalize"]["mode"] == "official"
    always = score_fixture(tmp_path, "vqav2", data, VQAV2_PREDICTIONS, normalize="always")
    assert always["metrics"]["accuracy"] == pytest.approx((1 + 0.9 + 0.3 + 1) / 4)
    assert always["normalize"]["mode"] == "always"


@pytest.mark.parametrize("layout", ["", "validation"])  # a saved DatasetDict, or one saved Dataset (its split)
def test_textvqa_save_to_disk_layout(tmp_path, layout):
    got = score_fixture(tmp_path, "textvqa", FIXTURES / "textvqa" / layout,
                        {10: "redwhite", 11: "coca cola", 12: "man's hat"})
    assert got["split"] == "validation"
    assert got["metrics"]["accuracy"] == pytest.approx((0.9 + 1.0 + 0.6) / 3)


def test_lazy_cells_come_from_the_right_parquet_row_group(tmp_path):
    file = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"id": list(range(25)), "image": [f"v{i}" for i in range(25)]}), file, row_group_size=4)
    rows = list(read_rows([file], ("id",)))
    for i in [24, 0, 13, 5, 22, 1, 9, 17, 3, 20, 11, 7, 24]:  # jumps across the 7 row groups, past the cache size
        assert rows[i].lazy["image"]() == f"v{i}"


def test_gqa_joins_images_and_averages_over_balanced_questions(tmp_path):
    preds = {"g1": "Yes.", "g2": "left side", "g3": "tshirt", "g4": "no"}
    official = score_fixture(tmp_path, "gqa", FIXTURES / "gqa", preds)
    assert official["metrics"]["accuracy"] == pytest.approx(1 / 3)  # g4 is not balanced
    assert official["metrics"]["accuracy_all_questions"] == pytest.approx(2 / 4)
    always = score_fixture(tmp_path, "gqa", FIXTURES / "gqa" / "testdev_balanced_instructions", preds,
                           normalize="always")
    assert always["metrics"]["accuracy"] == pytest.approx(2 / 3)


def test_pope_per_split_metrics(tmp_path):
    preds = {"adversarial/1": "Yes, there is a cat.", "adversarial/2": "NO", "adversarial/3": "No.",
             "adversarial/4": "There is not a dog.", "popular/1": "yes", "popular/2": "yes",
             "popular/3": "I don't know", "popular/4": "no"}
    got = score_fixture(tmp_path, "pope", FIXTURES / "pope", preds)["metrics"]
    assert got["per_split"]["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "n": 4})
    assert got["per_split"]["popular"] == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.75, "n": 4})
    assert got["f1_mean_over_splits"] == pytest.approx(0.75)
    assert (got["accuracy"], got["precision"], got["recall"], got["yes_ratio"]) == pytest.approx((0.75, 0.8, 0.8, 5 / 8))


def test_mme_acc_plus_and_totals(tmp_path):
    preds = {"existence/1.png#0": "Yes", "existence/1.png#1": "no", "existence/2.png#0": "yes",
             "existence/2.png#1": "Yes, I think", "code_reasoning/3.png#0": "None", "code_reasoning/3.png#1": "not sure"}
    got = score_fixture(tmp_path, "mme", FIXTURES / "mme", preds)
    assert (got["metrics"]["perception"], got["metrics"]["cognition"]) == pytest.approx((125.0, 50.0))
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    # lmms-eval's prompt: MME's "Please answer yes or no." replaced by the short-answer instruction
    assert samples[0]["prompt"] == "Is there a cat in this image?\nAnswer the question using a single word or phrase."


def test_docvqa_anls(tmp_path):
    got = score_fixture(tmp_path, "docvqa", FIXTURES / "docvqa", {"d1": "1,000", "d2": "abXY", "d3": "  hello   world "})
    assert got["metrics"]["anls"] == pytest.approx((5 / 6 + 0 + 1) / 3)


def test_scienceqa_prompt_and_accuracy(tmp_path):
    got = score_fixture(tmp_path, "scienceqa", FIXTURES / "scienceqa", {0: "B", 1: "a", 2: "The answer is C.", 3: "I think B"})
    assert got["metrics"]["accuracy"] == pytest.approx(0.75)
    first = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == ("Context: A hint.\nWhich animal can fly?\nA. cat\nB. bird\nC. fish\n"
                               "Answer with the option's letter from the given choices directly.")


def test_mmbench_circular(tmp_path):
    preds = {1: "A", 1000001: "D. cat", 2000001: "The cat", 3000001: "B", 2: "B", 1000002: "B"}
    got = score_fixture(tmp_path, "mmbench", FIXTURES / "mmbench", preds)["metrics"]
    assert got["circular_accuracy"] == 0.5  # question 2 fails one of its two rotations
    assert got["vanilla_accuracy"] == pytest.approx(5 / 6)
    assert got["per_category"] == {"attribute_recognition": 1.0, "spatial_relationship": 0.0}
    assert got["per_l2_category"] == {"FP-S": 1.0, "RR": 0.0}
    loaded = prepare_samples(get_task("mmbench"), FIXTURES / "mmbench", None, None, None, BadRecords())
    assert loaded.samples[4].prompt == ("Look closely.\nWhich one is shown?\nA. yes\nB. no\n"
                                        "Answer with the option's letter from the given choices directly.")


def test_easyvqa_needs_no_data_path():
    loaded = prepare_samples(get_task("easy-vqa"), None, None, None, None, BadRecords())
    assert len(loaded.samples) == 9673 and loaded.split == "test"
    assert loaded.samples[0].image.load().size == (64, 64)


def test_score_cli_writes_results_samples_and_summary(tmp_path, capsys):
    preds = write_predictions(tmp_path / "p.jsonl", {1: "two", 2: "Yes.", 3: "red"})  # q4 has no prediction
    assert eval_cli(["score", "--task", "vqav2", "--data", str(FIXTURES / "vqav2" / "official"),
                     "--predictions", str(preds), "--output", str(tmp_path / "out"), "--normalize", "always"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["missing_predictions"]["count"] == 1
    assert results["metrics"]["accuracy"] == pytest.approx((1 + 0.9 + 0.3) / 3)
    assert set(results["provenance"]) >= {"versions", "git_revision", "device", "date"}
    for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert 0 <= record["score"] <= 1 and "question_id" in record and "prompt" in record
    assert "| accuracy | 73.33 |" in (tmp_path / "out" / "summary.md").read_text()
    assert "1 questions have no prediction" in capsys.readouterr().err
