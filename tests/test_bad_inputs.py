"""The bad-input corpus (issue 9): API, config, checkpoints and CLI.

Every case asserts the error type, that the message names the bad thing, and that the same engine then
answers exactly as before (`probe`). CLI cases assert exit 2 and one `error: ...` line on stderr.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vismmoe
from vismmoe import BudgetError, ConfigError, InputError, ModelLoadError, VismmoeError
from vismmoe.cli import main as cli_main
from vismmoe.errors import EngineClosedError

from .conftest import random_requests

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def engine(qwen_checkpoint):
    return vismmoe.load(qwen_checkpoint, expert_budget=0.5)


@pytest.fixture(scope="module")
def request_(engine):
    (image, prompt), = random_requests(1, seed=21)
    return image, prompt


@pytest.fixture(scope="module")
def probe(engine, request_):
    """After every error the engine must still give exactly this answer."""
    image, prompt = request_
    want = engine.generate(image=image, prompt=prompt, max_new_tokens=6).token_ids
    assert len(want) == 6

    def check():
        assert engine.generate(image=image, prompt=prompt, max_new_tokens=6).token_ids == want

    return check


def _copy(checkpoint: Path, target: Path) -> Path:
    shutil.copytree(checkpoint, target)
    return target


# ---- configuration values: strict types ---------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("trust_remote_code", "false"), ("trust_remote_code", 0), ("prefetch", "no"), ("do_sample", "no"),
    ("measure_stalls", "x"), ("cuda_graphs", 1), ("prefetch_prefill", None), ("prefetch_depth", True),
    ("prefetch_depth", "2"), ("prefetch_limit", 1.0), ("max_new_tokens", 2.5), ("max_new_tokens", 0),
    ("device", 0), ("policy", ["lru"]), ("dtype", "float64"), ("store", "disk"), ("decode", "fast"),
    ("attn_implementation", "flash"), ("experts_kernel", "triton"), ("device", "gpu"),
])
def test_config_value_of_wrong_type_or_range(qwen_checkpoint, probe, key, value):
    with pytest.raises(ConfigError, match=key):
        vismmoe.load(qwen_checkpoint, config={key: value})
    probe()


def test_string_false_in_yaml_is_not_true(tmp_path, qwen_checkpoint, probe):
    path = tmp_path / "deploy.yaml"
    path.write_text('engine:\n  trust_remote_code: "false"\n')
    with pytest.raises(ConfigError, match="trust_remote_code must be true or false.*'false'"):
        vismmoe.load(qwen_checkpoint, config=path)
    probe()


def _remote_code_checkpoint(tmp_path: Path, qwen_checkpoint: Path) -> tuple[Path, Path]:
    """A checkpoint whose config names local Python code that leaves a marker file when imported."""
    ckpt = _copy(qwen_checkpoint, tmp_path / "remote")
    marker = tmp_path / "code-ran"
    (ckpt / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_model'\n")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="evil_model", auto_map={"AutoConfig": "evil.EvilConfig"})
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, marker


@pytest.mark.parametrize("value", ["false", "true", 1, "no"])
def test_checkpoint_code_never_runs_unless_trust_remote_code_is_true(tmp_path, qwen_checkpoint, probe, value):
    ckpt, marker = _remote_code_checkpoint(tmp_path, qwen_checkpoint)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        vismmoe.load(ckpt, trust_remote_code=value)
    assert not marker.exists()
    probe()


def test_remote_code_checkpoint_is_refused_by_default(tmp_path, qwen_checkpoint, probe):
    ckpt, marker = _remote_code_checkpoint(tmp_path, qwen_checkpoint)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        vismmoe.load(ckpt)
    assert not marker.exists()
    probe()


# ---- configuration files and keys ----------------------------------------------------------------------------

def test_binary_yaml_file(tmp_path, qwen_checkpoint, probe):
    path = tmp_path / "deploy.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"deploy\.yaml.*not a text file"):
        vismmoe.load(qwen_checkpoint, config=path)
    probe()


@pytest.mark.parametrize("text,match", [
    ("engine: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must contain a mapping"),
    ("engine:\n  policy: lru\nexpert_budget: min\n", r"unknown top-level key\(s\) \['expert_budget'\]"),
    ("engine: lru\n", "`engine:` section .* must be a mapping"),
    ("expert_budget: 0.5\npolicyy: lru\n", r"policyy"),
    ("budget: 0.5\nexpert_budget: 0.25\n", "both 'budget' and 'expert_budget'"),
    ("engine:\n  budget: 0.5\n  expert_budget: 0.25\n", "both 'budget' and 'expert_budget'"),
    ("engine:\n  1: 2\n", "config keys must be strings"),
    ("engine:\n  device: null\n", "device must be a string"),
])
def test_bad_yaml_file(tmp_path, qwen_checkpoint, probe, text, match):
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        vismmoe.load(qwen_checkpoint, config=path)
    probe()


def test_an_override_replaces_either_budget_spelling(tmp_path, qwen_checkpoint, probe):
    path = tmp_path / "deploy.yaml"
    path.write_text("engine:\n  budget: 0.5\n")
    assert vismmoe.load_config(path, expert_budget="min").expert_budget == "min"
    with pytest.raises(ConfigError, match="both 'budget' and 'expert_budget'"):
        vismmoe.load_config(None, budget=0.5, expert_budget=0.25)
    probe()


@pytest.mark.parametrize("config", [123, 1.5, ["engine"], b"deploy.yaml"])
def test_config_of_wrong_type(qwen_checkpoint, probe, config):
    with pytest.raises(ConfigError, match="config must be a YAML file path, a dict or an EngineConfig"):
        vismmoe.load(qwen_checkpoint, config=config)
    probe()


def test_missing_config_file(tmp_path, qwen_checkpoint, probe):
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        vismmoe.load(qwen_checkpoint, config=tmp_path / "nope.yaml")
    probe()


# ---- the budget grammar ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["1.5", 1.5, "150%", "0%", "-3GiB", "lots", True, 0, "0", [], "2.0", "1e-3"])
def test_budget_that_does_not_parse(qwen_checkpoint, probe, budget):
    with pytest.raises(BudgetError, match="budget"):
        vismmoe.load(qwen_checkpoint, expert_budget=budget)
    probe()


@pytest.mark.parametrize("budget", [1, "1"])
def test_integer_budget_is_bytes_everywhere(qwen_checkpoint, probe, budget):
    with pytest.raises(BudgetError, match="integer budget is a byte count"):
        vismmoe.load(qwen_checkpoint, expert_budget=budget)
    probe()


def test_budget_grammar_is_shared_by_cli_and_api(capsys, probe):
    from vismmoe.config import parse_budget

    assert parse_budget("1") == parse_budget(1) == ("bytes", 1.0)
    assert parse_budget("1.0") == parse_budget(1.0) == ("fraction", 1.0)
    assert parse_budget("0.25") == parse_budget(0.25) == parse_budget("25%")
    assert parse_budget("4e9") == parse_budget(4_000_000_000) == ("bytes", 4e9)
    assert cli_main(["run", "--budget", "1.5", "--device", "cpu"]) == 2
    assert "expert budget must be in (0, 1], got 1.5" in capsys.readouterr().err
    probe()


# ---- decode: static settings refused at load / reconfigure -----------------------------------------------------

@pytest.mark.parametrize("overrides,match", [({"store": "mmap"}, "store: mmap")])
def test_static_decode_that_could_not_serve_is_refused_at_load(qwen_checkpoint, probe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static", **overrides)
    full = vismmoe.load(qwen_checkpoint, expert_budget=1.0, decode="static", **overrides)  # a full budget can
    assert full.generate(image=None, prompt="hi", max_new_tokens=2).stats.decode_path.startswith("static-")
    probe()


def test_reconfigure_errors_leave_the_engine_serving(engine, probe):
    before = engine.config
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['foo'\]"):
        engine.reconfigure(foo=1)
    with pytest.raises(ConfigError, match="prefetch must be auto, true or false"):
        engine.reconfigure(prefetch="no")
    with pytest.raises(ConfigError, match="visual_keep"):
        engine.reconfigure(visual_keep=0)
    with pytest.raises(ConfigError, match="cannot change on a loaded engine"):
        engine.reconfigure(dtype="float16")
    with pytest.raises(BudgetError):
        engine.reconfigure(budget="1.5")
    assert engine.config == before
    probe()


# ---- model directories and checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("model_dir", [None, 123, ["dir"]])
def test_model_dir_of_wrong_type(probe, model_dir):
    with pytest.raises(ModelLoadError, match="model_dir must be the path of a checkpoint directory"):
        vismmoe.load(model_dir)
    probe()


def test_model_dir_is_a_file_or_has_no_config(tmp_path, probe):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        vismmoe.load(file)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        vismmoe.load(tmp_path)
    probe()


def _shard(ckpt: Path) -> dict:
    """Split model.safetensors into two files with an index, as save_pretrained does for large models."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: tensors[k].contiguous() for k in part}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_sharded_checkpoint_follows_its_index(tmp_path, qwen_checkpoint, request_):
    ckpt = _copy(qwen_checkpoint, tmp_path / "sharded")
    _shard(ckpt)
    image, prompt = request_
    want = vismmoe.load(qwen_checkpoint, expert_budget=0.5).generate(image=image, prompt=prompt, max_new_tokens=6)
    got = vismmoe.load(ckpt, expert_budget=0.5).generate(image=image, prompt=prompt, max_new_tokens=6)
    assert got.token_ids == want.token_ids


def test_stray_safetensors_file_next_to_an_index_is_refused(tmp_path, qwen_checkpoint, probe):
    ckpt = _copy(qwen_checkpoint, tmp_path / "stray")
    tensors = _shard(ckpt)
    zeroed = {k: torch.zeros_like(v) for k, v in tensors.items() if "experts" in k}
    save_file(zeroed, str(ckpt / "old-backup.safetensors"))
    with pytest.raises(ModelLoadError, match=r"\['old-backup\.safetensors'\].*does not name"):
        vismmoe.load(ckpt)
    probe()


def test_index_naming_a_missing_file(tmp_path, qwen_checkpoint, probe):
    ckpt = _copy(qwen_checkpoint, tmp_path / "missing-shard")
    _shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors.*not in"):
        vismmoe.load(ckpt)
    probe()


def test_files_that_disagree_with_the_index(tmp_path, qwen_checkpoint, probe):
    ckpt = _copy(qwen_checkpoint, tmp_path / "disagree")
    _shard(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = next(k for k, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model-00001-of-00002\.safetensors holds 1 tensor.*disagree"):
        vismmoe.load(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid safetensors index"):
        vismmoe.load(ckpt)
    probe()


def test_duplicate_keys_across_files_without_an_index(tmp_path, qwen_checkpoint, probe):
    ckpt = _copy(qwen_checkpoint, tmp_path / "dup")
    tensors = load_file(str(ckpt / "model.safetensors"))
    key = next(k for k in tensors if "experts" in k)
    save_file({key: torch.zeros_like(tensors[key])}, str(ckpt / "old-backup.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"model\.safetensors and old-backup\.safetensors .* both hold '{key}'"):
        vismmoe.load(ckpt)
    probe()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="llama"), "llama"),
    (lambda c: c.update(model_type="no_such_model"), "no_such_model"),
])
def test_config_json_that_does_not_describe_the_weights(tmp_path, qwen_checkpoint, probe, edit, match):
    ckpt = _copy(qwen_checkpoint, tmp_path / "edited")
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=match):
        vismmoe.load(ckpt)
    probe()


def test_invalid_config_json(tmp_path, qwen_checkpoint, probe):
    ckpt = _copy(qwen_checkpoint, tmp_path / "badjson")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        vismmoe.load(ckpt)
    probe()


def test_processor_resolved_from_model_type(tmp_path, qwen_checkpoint, request_, probe):
    """Image processor and tokenizer saved separately, no processor_class anywhere: images still work."""
    ckpt = _copy(qwen_checkpoint, tmp_path / "noclass")
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = ckpt / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("processor_class", None)
            path.write_text(json.dumps(data))
    image, prompt = request_
    loaded = vismmoe.load(ckpt, expert_budget=0.5)
    assert hasattr(loaded.processor, "image_processor")
    assert loaded.generate(image=image, prompt=prompt, max_new_tokens=6).stats.visual_tokens_total > 0
    probe()


# ---- requests ---------------------------------------------------------------------------------------------------

def _closed_image():
    image = Image.new("RGB", (32, 32))
    image.close()
    return image


@pytest.mark.parametrize("image,match", [
    (lambda tmp: Image.new("RGB", (0, 0)), r"no pixels \(0x0\)"),
    (lambda tmp: Image.new("RGB", (1, 5000)), r"image \(1x5000\) cannot be prepared.*aspect ratio"),
    (lambda tmp: _closed_image(), "PIL image cannot be read.*closed"),
    (lambda tmp: "https://example.com/cat.png", "URLs are not fetched"),
    (lambda tmp: "file:///etc/passwd", "URLs are not fetched"),
    (lambda tmp: str(tmp), "is a directory, not an image file"),
    (lambda tmp: str(tmp / "no.png"), "no.png' does not exist"),
    (lambda tmp: 3.5, "image must be a file path, a PIL.Image or None, got float"),
    (lambda tmp: [Image.new("RGB", (8, 8))], "got list"),
])
def test_bad_image(tmp_path, engine, probe, image, match):
    with pytest.raises(InputError, match=match):
        engine.generate(image=image(tmp_path), prompt="what is it?")
    probe()


@pytest.mark.parametrize("prompt,match", [
    ("", "prompt must be a non-empty string"), ("  \n", "prompt must be a non-empty string"),
    (None, "prompt must be a non-empty string, got None"), (123, "got 123"),
    ("what \ud800 is it", r"not valid Unicode text.*character 5"),
    ("<|image_pad|> what is it", r"image placeholder '<\|image_pad\|>'"),
])
def test_bad_prompt(engine, probe, request_, prompt, match):
    with pytest.raises(InputError, match=match):
        engine.generate(image=request_[0], prompt=prompt)
    probe()


def test_prompt_longer_than_the_context_names_both_numbers(engine, probe):
    context = engine.context
    assert context == 4096
    with pytest.raises(InputError, match=rf"the prompt is \d+ tokens .*context is {context} tokens"):
        engine.generate(image=None, prompt="x" * (context + 10))
    probe()


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"do_sample": "no"}, "do_sample must be True or False"),
    ({"foo": 1}, r"unknown argument\(s\) \['foo'\]"),
    ({"num_beams": 0}, "num_beams must be an integer >= 1"),
    ({"temperature": "hot", "do_sample": True}, "temperature must be a number > 0"),
    ({"top_p": 1.5, "do_sample": True}, r"top_p must be a number in \(0, 1\]"),
    ({"min_new_tokens": -1}, "min_new_tokens must be an integer >= 0"),
    ({"num_return_sequences": 2}, "num_return_sequences must be 1"),
    ({"return_dict_in_generate": True}, "return_dict_in_generate"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
])
def test_bad_generation_arguments(engine, probe, request_, kwargs, match):
    with pytest.raises(InputError, match=match) as info:
        engine.generate(image=request_[0], prompt=request_[1], **kwargs)
    if "max_new_tokens" not in kwargs:
        assert str(info.value).startswith("invalid generation arguments: ")
    probe()


def test_errors_inside_decoding_are_reported_as_what_they_are(engine, probe, request_, monkeypatch):
    """Issue 14: only the arguments' own validation says "invalid generation arguments"."""
    def broken(*args, **kwargs):
        raise ValueError("something broke inside the decode step")

    for decode in ("generate", "auto"):
        engine.reconfigure(decode=decode)
        monkeypatch.setattr(engine.runtime, "begin_step", broken)
        with pytest.raises(ValueError, match="something broke inside the decode step") as info:
            engine.generate(image=request_[0], prompt=request_[1], max_new_tokens=3)
        assert not isinstance(info.value, VismmoeError)
        monkeypatch.undo()
    engine.reconfigure(decode="auto")
    probe()


def test_closed_engine(qwen_checkpoint, probe):
    closed = vismmoe.load(qwen_checkpoint, expert_budget=0.5)
    closed.close()
    with pytest.raises(EngineClosedError, match="engine is closed"):
        closed.generate(image=None, prompt="hi")
    with pytest.raises(EngineClosedError, match="engine is closed"):
        closed.reconfigure(policy="lfu")
    probe()


# ---- the CLI: one error path -----------------------------------------------------------------------------------

def _cli_error(capsys, argv, match) -> None:
    code = cli_main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert __import__("re").search(match, lines[-1]), lines[-1]


@pytest.mark.parametrize("argv,match", [
    (["run", "--budget", "1.5"], r"got 1\.5"),
    (["run", "--budget", "1"], "integer budget is a byte count"),
    (["run", "--prompt", ""], "prompt must be a non-empty string"),
    (["run", "--model", "/no/such/model"], "/no/such/model' does not exist"),
    (["run", "--image", "/no/such.png"], "/no/such.png' does not exist"),
    (["run", "--image", "https://example.com/a.png"], "URLs are not fetched"),
    (["run", "--device", "tpu"], "device must be"),
    (["eval", "--model", "m", "--task", "nope", "--output", "{tmp}/o"], "unknown task 'nope'"),
    (["eval", "--model", "m", "--task", "vqav2", "--output", "{tmp}/o"], "needs --data"),
    (["eval", "--model", "m", "--task", "pope", "--data", "{fixtures}/pope", "--sweep", "keep=1.0,0.5",
      "--output", "{tmp}/o"], r"unknown sweep key 'keep'; valid keys are: .*budget"),
    (["eval", "--model", "m", "--task", "pope", "--data", "{tmp}/nowhere", "--output", "{tmp}/o"], "does not exist"),
    (["eval", "--model", "/no/model", "--task", "pope", "--data", "{fixtures}/pope", "--output", "{tmp}/o"],
     "does not exist"),
    (["score", "--task", "pope", "--data", "{fixtures}/pope", "--predictions", "{tmp}/p.jsonl", "--output", "{tmp}/o"],
     "predictions file does not exist"),
    (["score", "--task", "nope", "--predictions", "{tmp}/p.jsonl", "--output", "{tmp}/o"], "unknown task"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, probe, argv, match):
    argv = [a.format(tmp=tmp_path, fixtures=FIXTURES) for a in argv]
    if argv[0] == "run" and "--device" not in argv:
        argv += ["--device", "cpu"]
    _cli_error(capsys, argv, match)
    probe()


def test_cli_bad_config_file(tmp_path, capsys, probe):
    path = tmp_path / "deploy.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    _cli_error(capsys, ["run", "--config", str(path), "--device", "cpu"], "not a text file")
    probe()


def test_cli_bad_predictions_file(tmp_path, capsys, probe):
    preds = tmp_path / "p.jsonl"
    preds.write_text("not json\n")
    _cli_error(capsys, ["score", "--task", "pope", "--data", str(FIXTURES / "pope"), "--predictions", str(preds),
                        "--output", str(tmp_path / "o")], r"record line 1: not JSON")
    probe()


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "m", "--task", "pope", "--limit", "0"],
    ["eval", "--model", "m", "--task", "pope", "--limit", "-1"],
    ["eval", "--model", "m", "--task", "pope", "--max-new-tokens", "0"],
    ["run", "--max-new-tokens", "0"],
    ["run", "--max-new-tokens", "many"],
])
def test_cli_numbers_that_are_not_positive(capsys, probe, argv):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
    probe()


def test_api_limit_and_max_new_tokens_are_checked(tmp_path, probe):
    from vismmoe.evaluation.runner import run_eval

    for kwargs, match in (({"limit": 0}, "limit must be a positive integer"),
                          ({"limit": -1}, "limit must be a positive integer"),
                          ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer")):
        with pytest.raises(ConfigError, match=match):
            run_eval("m", "pope", FIXTURES / "pope", output=tmp_path, progress=False,
                     engine_factory=lambda *a, **k: None, **kwargs)
    probe()


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"vismmoe {vismmoe.__version__}"


def test_cli_unexpected_errors_keep_their_traceback():
    import argparse

    from vismmoe.cli import run_command

    def bug(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_command(argparse.Namespace(func=bug))


def test_ctrl_c_during_eval_says_what_was_saved(tmp_path, capsys, probe, qwen_checkpoint, monkeypatch):
    from vismmoe.evaluation import runner

    calls = {"n": 0}
    real_load = vismmoe.load

    class Interrupting:
        def __init__(self, engine):
            self.engine, self.config = engine, engine.config

        def generate(self, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return self.engine.generate(**kwargs)

        def close(self):
            self.engine.close()

    monkeypatch.setattr(runner, "_default_factory", lambda model, config=None, **o: Interrupting(real_load(model, config=config, **o)))
    argv = ["eval", "--model", str(qwen_checkpoint), "--task", "pope", "--data", str(FIXTURES / "pope"),
            "--limit", "5", "--max-new-tokens", "2", "--output", str(tmp_path / "o"), "--no-progress"]
    assert cli_main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted: 2/5 saved; re-run to resume"
    monkeypatch.undo()
    assert cli_main(argv) == 0  # resumes: 3 more
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["n_samples"] == 5
    # What ran is recorded, not "auto" or the engine's default generation length.
    assert results["config"]["device"] == "cpu" and results["config"]["dtype"] == "float32"
    assert results["config"]["max_new_tokens"] == results["max_new_tokens"] == 2
    probe()


def test_score_needs_no_images(tmp_path, capsys, probe):
    data = tmp_path / "vqav2"
    shutil.copytree(FIXTURES / "vqav2" / "official", data)
    for image in data.rglob("*.jpg"):
        image.unlink()
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"question_id": q, "prediction": "two"}) + "\n" for q in (1, 2, 3, 4)))
    assert cli_main(["score", "--task", "vqav2", "--data", str(data), "--predictions", str(preds),
                     "--output", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["n_samples"] == 4
    probe()


def test_demo_model_is_found_or_named(tmp_path, capsys, monkeypatch, probe):
    from vismmoe.cli import DEMO_ENV, demo_model

    assert (demo_model() / "config.json").is_file()  # the source checkout's models/easyvqa-qwen3vlmoe
    monkeypatch.setenv(DEMO_ENV, str(tmp_path / "missing"))
    _cli_error(capsys, ["run", "--device", "cpu"], rf"no demo model: {DEMO_ENV}=.*missing.*--model DIR")
    probe()
