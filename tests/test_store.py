"""Host store: every checkpoint layout and every store tier gives the same answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vismmoe
from vismmoe.config import parse_budget

from .conftest import random_requests

REQUESTS = random_requests(4, seed=11)


def answers(model_dir, **overrides):
    engine = vismmoe.load(model_dir, **overrides)
    return [engine.generate(image=i, prompt=p, max_new_tokens=6).token_ids for i, p in REQUESTS]


@pytest.fixture(scope="module")
def baseline(qwen_checkpoint):
    return answers(qwen_checkpoint)


def _rewrite(src, dst, transform):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    transform(dst, tensors)


def _legacy(dst, tensors):
    # Qwen3-VL hub files store gate_up [E, H, 2I] and down [E, I, H] (transformers 4 layout).
    for key in list(tensors):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_legacy_fused_layout(tmp_path, qwen_checkpoint, baseline):
    _rewrite(qwen_checkpoint, tmp_path / "legacy", _legacy)
    assert answers(tmp_path / "legacy") == baseline


def test_per_expert_layout_sharded(tmp_path, qwen_checkpoint, baseline):
    _rewrite(qwen_checkpoint, tmp_path / "per_expert", _per_expert)
    assert answers(tmp_path / "per_expert", expert_budget=0.5) == baseline


def _per_expert(dst, tensors):
    # Per-expert nn.Linear keys (InternVL/GLM hub style), spread over two shards with an index.
    out = {}
    for key, t in tensors.items():
        if key.endswith("experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif key.endswith("experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[key] = t
    keys = sorted(out)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: out[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _bf16_experts(dst, tensors):
    # A hub checkpoint's usual case: the expert weights stored in bfloat16.
    for key in list(tensors):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key] = tensors[key].to(torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


_LAYOUTS = {"legacy": _legacy, "per_expert": _per_expert, "fused_bf16": _bf16_experts}


@pytest.mark.parametrize("layout,positioned", [("fused", True), ("fused_bf16", True), ("legacy", False),
                                               ("per_expert", True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_positioned_reads_equal_the_slices(tmp_path, qwen_checkpoint, layout, positioned, dtype):
    """A record whose blocks lie in the files as it holds them (fused transformers 5, per expert) is read with
    positioned reads at the byte offsets of the safetensors header (at the file's dtype, then cast where the
    store's differs: float32 and bfloat16 files, both store dtypes); a transposed layout goes through
    safetensors' slices. Every record equals the slices'."""
    model = qwen_checkpoint
    if layout != "fused":
        model = tmp_path / layout
        _rewrite(qwen_checkpoint, model, _LAYOUTS[layout])
    engine = vismmoe.load(model, dtype=dtype, store="mmap")
    store = engine.store
    assert all((entry is not None) == positioned for row in store._spans for entry in row)
    for layer in range(store.num_layers):
        for expert in range(store.num_experts):
            via_slices = torch.empty(store.record_numel, dtype=store.dtype)
            store._read_via_slices(layer, expert, via_slices)
            assert torch.equal(store.record(layer, expert), via_slices), (layer, expert)
    engine.close()


def test_records_above_the_size_cap_go_through_the_slices(qwen_checkpoint, monkeypatch):
    """A record larger than POSITIONED_READ_MAX_BYTES at the file's dtype (the bench model's 9 MiB ones: one
    thread's kernel copy lost to torch's threaded copy from the memory map) is read through safetensors'
    slices; one at the cap still takes positioned reads. Both read the same record. The cap counts the file's
    bytes, not the store's: a bfloat16 store of the float32 file reads positioned at the float32 size."""
    from vismmoe.offload import store as store_module

    for dtype in ("float32", "bfloat16"):
        engine = vismmoe.load(qwen_checkpoint, dtype=dtype, store="mmap")
        file_bytes = engine.store.record_numel * 4  # (the tiny checkpoint is float32)
        expected = [engine.store.record(0, e).clone() for e in range(engine.store.num_experts)]
        engine.close()
        for cap, positioned in ((file_bytes, True), (file_bytes - 1, False)):
            monkeypatch.setattr(store_module, "POSITIONED_READ_MAX_BYTES", cap)
            engine = vismmoe.load(qwen_checkpoint, dtype=dtype, store="mmap")
            assert all((entry is not None) == positioned for row in engine.store._spans for entry in row), (dtype, cap)
            assert all(torch.equal(engine.store.record(0, e), expected[e]) for e in range(engine.store.num_experts))
            engine.close()
        monkeypatch.undo()


def test_a_checkpoint_cut_short_under_an_mmap_store_raises_a_clear_error(tmp_path, qwen_checkpoint):
    """A file that loses its tail while an mmap store reads from it (rewritten in place) gives ModelLoadError
    naming the file, where a memory map of it would fault; the records before the cut still read."""
    from vismmoe.errors import ModelLoadError

    shutil.copytree(qwen_checkpoint, tmp_path / "m")
    engine = vismmoe.load(tmp_path / "m", store="mmap")
    store = engine.store
    spans = [(offset, layer, expert) for layer, row in enumerate(store._spans)
             for expert, (_, blocks) in enumerate(row) for _, offset, _, _ in blocks]
    last, first = max(spans), min(spans)
    before = store.record(first[1], first[2]).clone()
    with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
        f.truncate(last[0] + 16)
    with pytest.raises(ModelLoadError, match="model.safetensors ends at byte .* truncated"):
        store.record(last[1], last[2])
    assert torch.equal(store.record(first[1], first[2]), before)
    engine.close()


def test_a_per_expert_block_of_the_wrong_shape_is_named_not_read(tmp_path, qwen_checkpoint):
    """Per-expert keys (Mixtral's w1/w3/w2 names) with w2 stored [I, H] where the model holds [H, I]: the
    bytes add up, but the positioned path leaves it to the slices' copy, which names the mismatch (loading
    the store reads every record)."""
    from vismmoe.errors import ModelLoadError

    def mixtral_names_w2_transposed(dst, tensors):
        out = {}
        for key, t in tensors.items():
            if key.endswith("experts.gate_up_proj"):
                base, inter = key[: -len("gate_up_proj")], t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{base}{e}.w1.weight"], out[f"{base}{e}.w3.weight"] = t[e, :inter].clone(), t[e, inter:].clone()
            elif key.endswith("experts.down_proj"):
                base = key[: -len("down_proj")]
                for e in range(t.shape[0]):
                    out[f"{base}{e}.w2.weight"] = t[e].t().contiguous()
            else:
                out[key] = t
        save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})

    _rewrite(qwen_checkpoint, tmp_path / "m", mixtral_names_w2_transposed)
    with pytest.raises(ModelLoadError, match="does not match the model config"):
        vismmoe.load(tmp_path / "m", store="memory")


@pytest.mark.parametrize("store", ["memory", "mmap"])
def test_store_tiers(qwen_checkpoint, baseline, store):
    assert answers(qwen_checkpoint, store=store, expert_budget="min") == baseline


def test_store_records_match_checkpoint(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint)
    tensors = load_file(str(qwen_checkpoint / "model.safetensors"))
    layer = engine.layout.layers[1]
    key = next(k for k in tensors if k.endswith(f"layers.{layer.decoder_index}.mlp.experts.gate_up_proj"))
    gate_up, down = engine.store.split(engine.store.record(1, 3))
    assert torch.equal(gate_up, tensors[key][3])
    assert torch.equal(down, tensors[key.replace("gate_up_proj", "down_proj")][3])
    # The fused parameters are released from the model: the store holds the only copy.
    assert layer.experts.gate_up_proj.numel() == 0 and layer.experts.down_proj.numel() == 0


@pytest.mark.parametrize("text,expected", [
    ("12GiB", ("bytes", 12 * 2**30)), ("800MB", ("bytes", 800e6)), ("25%", ("fraction", 0.25)),
    (0.5, ("fraction", 0.5)), ("0.25", ("fraction", 0.25)), (4096, ("bytes", 4096)), ("min", ("min", 0.0)),
    ("1.5 GiB", ("bytes", 1.5 * 2**30)),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


def test_huge_page_tensor_is_aligned_contiguous_and_outlives_its_mapping():
    """The slab's allocation (2 MiB aligned, THP-advised): contiguous, of the asked shape and dtype, and its
    memory stays valid after the mapping object's last Python name is gone (the tensor holds it)."""
    import gc

    import torch

    from vismmoe.offload.store import huge_page_tensor

    slab = huge_page_tensor((3, 4, 1 << 19), torch.bfloat16)
    assert slab.shape == (3, 4, 1 << 19) and slab.dtype == torch.bfloat16 and slab.is_contiguous()
    assert slab.data_ptr() % (2 << 20) == 0
    rows = slab.view(12, -1)
    gc.collect()
    rows.copy_(torch.arange(12, dtype=torch.bfloat16)[:, None].expand_as(rows))
    gc.collect()
    assert torch.equal(slab[2, 3], torch.full((1 << 19,), 11.0, dtype=torch.bfloat16))
    small = huge_page_tensor((2, 3), torch.float32)  # below one huge page: ordinary memory
    assert small.shape == (2, 3)


def test_engine_slab_is_the_huge_page_allocation():
    """README: the `pinned` / `memory` slabs ask for 2 MiB pages: the bundled model's 12 MiB slab (the default
    store) sits on a 2 MiB-aligned anonymous mapping, the huge_page_tensor allocation."""
    from pathlib import Path

    bundled = Path(__file__).resolve().parents[1] / "models" / "easyvqa-qwen3vlmoe"
    engine = vismmoe.load(bundled)
    slab = engine.store.slab
    assert slab.numel() * slab.element_size() >= 2 << 20
    assert slab.data_ptr() % (2 << 20) == 0


def test_the_read_size_benchmark_times_both_reads_and_refuses_bad_sizes(tmp_path, capsys):
    """eval/bench_record_reads.py --sizes (what POSITIONED_READ_MAX_BYTES is set from): one row per size with
    both reads timed, written as JSON; a size that is not a positive integer is refused by name."""
    from .conftest import import_script

    script = import_script(Path(__file__).resolve().parents[1] / "eval" / "bench_record_reads.py")
    assert script.main(["--sizes", "4,16", "--passes", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_read_sizes.json").read_text())["rows"]
    assert [r["record_kib"] for r in rows] == [4, 16]
    assert all(r["positioned_us"] > 0 and r["slices_us"] > 0 and r["records"] >= 8 for r in rows)
    for bad in ("x", "0,16"):
        with pytest.raises(SystemExit):
            script.main(["--sizes", bad])
        assert "--sizes" in capsys.readouterr().err
