"""The weight files of a checkpoint directory, checked before anything is loaded from them.

With model.safetensors.index.json the files must be exactly those the index names, each holding the
tensors the index places in it; without an index no tensor may be in two files. A stray
`old-backup.safetensors` would otherwise replace weights silently.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked: readable, and agreeing with the index
    (or, without one, no tensor in two files)."""
    if not model_dir.exists():
        raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"{str(model_dir)!r} is not a directory; pass a Hugging Face checkpoint directory")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{str(model_dir)!r} has no config.json; it is not a Hugging Face checkpoint directory")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(others)}: vismmoe loads safetensors only; re-save with save_pretrained)" if others else ""
        raise ModelLoadError(f"no .safetensors weight files in {str(model_dir)!r}{hint}")
    from safetensors import SafetensorError, safe_open

    keys_of = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys_of[path.name] = set(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{path} is truncated or corrupt ({exc}); re-download or re-save the checkpoint"
            ) from None
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        _check_index(index, keys_of)
    else:
        _check_no_duplicates(model_dir, keys_of)
    return files


def _check_index(index: Path, keys_of: dict[str, set]) -> None:
    """Every weight file agrees with model.safetensors.index.json: the files it names, no others, and each
    key in the file the index says (a stray backup file would otherwise replace weights silently)."""
    import json

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint") from None
    named = set(weight_map.values())
    missing = sorted(named - set(keys_of))
    if missing:
        raise ModelLoadError(f"{index} names weight file(s) {missing} that are not in {index.parent}; "
                             "the checkpoint is incomplete: re-download it")
    extra = sorted(set(keys_of) - named)
    if extra:
        raise ModelLoadError(f"{index.parent} holds safetensors file(s) {extra} that {index.name} does not name; "
                             "move them out of the checkpoint directory (a stray file would change the weights)")
    for name, keys in sorted(keys_of.items()):
        wrong = sorted(k for k in keys if weight_map.get(k) != name)
        if wrong:
            raise ModelLoadError(f"{name} holds {len(wrong)} tensor(s) that {index.name} places elsewhere or not at "
                                 f"all (e.g. {wrong[0]!r} -> {weight_map.get(wrong[0])!r}); the files disagree with "
                                 "the index: re-save or re-download the checkpoint")
    absent = sorted(k for k, f in weight_map.items() if k not in keys_of[f])
    if absent:
        raise ModelLoadError(f"{index.name} places {absent[0]!r} in {weight_map[absent[0]]} but that file does not hold "
                             f"it ({len(absent)} such tensor(s)); re-download the checkpoint")


def _check_no_duplicates(model_dir: Path, keys_of: dict[str, set]) -> None:
    owner = {}
    for name, keys in sorted(keys_of.items()):
        for key in keys:
            if key in owner:
                raise ModelLoadError(
                    f"{owner[key]} and {name} in {str(model_dir)!r} both hold {key!r}; a checkpoint holds each tensor "
                    "once: remove the stray file (or add the model.safetensors.index.json that says which is used)")
            owner[key] = name
