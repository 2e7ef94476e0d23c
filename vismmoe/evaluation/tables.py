"""Read benchmark tables from local files in the layouts the Hugging Face hub publishes them in.

Accepted, never fetched from a hub:
- parquet files as the hub stores them (`data/validation-00000-of-00002.parquet`, `en/dev-00000-of-00001.parquet`);
- a `datasets` `save_to_disk` directory (a Dataset: `state.json` + `data-*.arrow`, or a DatasetDict:
  `dataset_dict.json` + one such directory per split), read with pyarrow alone;
- a single .parquet or .arrow file.
Image columns are not read up front (a VQAv2 split is tens of GB): each row gets a fetcher that reads
its cell when the image is needed.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import EvalDataError

_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


@dataclass
class Row:
    file: Path
    index: int  # row number within `file`
    values: dict  # every column except the lazy ones
    lazy: dict[str, Callable[[], Any]]  # column -> fetcher of that cell


def find_split(path: Path, split: str | None, preferred: tuple[str, ...]) -> tuple[str, list[Path]]:
    """The files of one split under `path`: `split` if given, the only split, or the first preferred one."""
    path = Path(path)
    if not path.exists():
        raise EvalDataError("the data path does not exist", file=path)
    splits = _splits(path)
    if not splits:
        raise EvalDataError("no .parquet files, .arrow files or save_to_disk dataset found here", file=path)
    if split is not None:
        if split not in splits:
            raise EvalDataError(f"no split {split!r}; found splits {sorted(splits)}", file=path)
        return split, splits[split]
    if len(splits) == 1:
        return next(iter(splits.items()))
    for name in preferred:
        if name in splits:
            return name, splits[name]
    raise EvalDataError(f"several splits found ({', '.join(sorted(splits))}); choose one with --split", file=path)


def _splits(path: Path) -> dict[str, list[Path]]:
    if path.is_file():
        return {_split_name(path): [path]}
    if (path / "dataset_dict.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return {name: _saved_dataset_files(path / name) for name in names}
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        return {state.get("_split") or path.name: _saved_dataset_files(path)}
    files = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.arrow"))
    configs = sorted({str(f.parent.relative_to(path)) for f in files})
    if len(configs) > 1:
        raise EvalDataError(
            f"files of several dataset configs found ({', '.join(configs)}); point the data path at one of them",
            file=path)
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(_split_name(f), []).append(f)
    return splits


def _split_name(file: Path) -> str:
    match = _SHARD.match(file.stem)
    return match["split"] if match else file.stem


def _saved_dataset_files(directory: Path) -> list[Path]:
    state_file = directory / "state.json"
    if not state_file.is_file():
        raise EvalDataError("state.json missing from a save_to_disk split directory", file=state_file)
    state = json.loads(state_file.read_text())
    files = [directory / entry["filename"] for entry in state.get("_data_files", [])]
    for f in files:
        if not f.is_file():
            raise EvalDataError("data file listed in state.json is missing", file=f)
    return files


def read_rows(files: list[Path], required: tuple[str, ...], lazy: tuple[str, ...] = ("image",)) -> Iterator[Row]:
    """Rows of every file in order; `required` columns must exist, `lazy` ones are fetched on demand."""
    for file in files:
        source = _open(file)
        names = list(source.schema.names)
        missing = [c for c in required if c not in names]
        if missing:
            raise EvalDataError(f"missing column(s) {missing}; the file has {names}", file=file)
        eager = [c for c in names if c not in lazy]
        lazy_here = [c for c in lazy if c in names]
        for index, values in enumerate(source.read(eager).to_pylist()):
            fetchers = {c: (lambda c=c, i=index, s=source: s.cell(c, i)) for c in lazy_here}
            yield Row(file, index, values, fetchers)


def _open(file: Path):
    file = Path(file)
    try:
        return _ParquetSource(file) if file.suffix == ".parquet" else _ArrowSource(file)
    except EvalDataError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise EvalDataError(f"cannot read the file ({exc})", file=file) from exc


class _ArrowSource:
    """A save_to_disk .arrow file (an Arrow IPC stream), memory-mapped: cells are read without copying."""

    def __init__(self, file: Path):
        import pyarrow as pa

        self.table = pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
        self.schema = self.table.schema

    def read(self, columns):
        return self.table.select(columns)

    def cell(self, column, index):
        return self.table.column(column)[index].as_py()


class _ParquetSource:
    """A parquet file; lazy cells are read a row group at a time, keeping the last few row groups read
    (GQA reads its images table in question order, which jumps between row groups)."""

    CACHED_GROUPS = 8

    def __init__(self, file: Path):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(file)
        self.schema = self.file.schema_arrow
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self.cache: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def read(self, columns):
        return self.file.read(columns=columns)

    def cell(self, column, index):
        group = bisect.bisect_right(self.starts, index) - 1
        key = (column, group)
        if key not in self.cache:
            self.cache[key] = self.file.read_row_group(group, columns=[column]).column(0)
            if len(self.cache) > self.CACHED_GROUPS:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key][index - self.starts[group]].as_py()
