"""One benchmark question, as every task loader returns it, and its lazily loaded image."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import EvalDataError


@dataclass
class ImageRef:
    """Where a sample's image comes from, opened only when the model needs it (scoring never does).

    `fetch` returns what the data holds: a path, raw bytes, a datasets Image cell {"bytes", "path"},
    or None (a missing image, reported as bad data when loaded).
    """

    fetch: Callable[[], Any]
    describe: str  # for samples.jsonl: a path, or "file#row"
    file: Any = None
    record: Any = None
    question_id: Any = None
    base_dir: Path | None = None  # relative paths inside a table are relative to the dataset directory
    path: Path | None = None  # the local file, when the image is one (checked up front by run_eval)

    def missing(self) -> EvalDataError | None:
        """The error for a local image file that does not exist (None otherwise)."""
        if self.path is None or self.path.is_file():
            return None
        return EvalDataError(f"image file {self.path} does not exist", file=self.file, record=self.record,
                             question_id=self.question_id)

    def load(self):
        from PIL import Image

        value = self.fetch()
        if isinstance(value, dict):  # the datasets Image feature: bytes, or a path when saved without bytes
            value = value.get("bytes") or value.get("path")
        try:
            if value is None or value == b"" or value == "":
                raise ValueError("the image is missing (null)")
            if isinstance(value, (bytes, bytearray, memoryview)):
                image = Image.open(io.BytesIO(bytes(value)))
            elif isinstance(value, (str, Path)):
                path = Path(value)
                if not path.is_absolute() and self.base_dir is not None:
                    path = self.base_dir / path
                if not path.is_file():
                    raise ValueError(f"image file {path} does not exist")
                image = Image.open(path)
            elif hasattr(value, "convert"):
                image = value
            else:
                raise ValueError(f"cannot read an image from a {type(value).__name__}")
            return image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise EvalDataError(str(exc), file=self.file, record=self.record, question_id=self.question_id) from exc


def image_from_path(path, *, file=None, record=None, question_id=None) -> ImageRef:
    path = Path(path)
    return ImageRef(lambda: path, str(path), file=file, record=record, question_id=question_id, path=path)


@dataclass
class Sample:
    question_id: Any  # as in the data (int or str); predictions are matched on str(question_id)
    question: str
    references: list[str]
    image: ImageRef | None
    # Values a prompt template may use ({question}, {options}, ...).
    prompt_fields: dict = field(default_factory=dict)
    # Task data that scoring needs (answer type, category, options, circular group...); written to samples.jsonl.
    fields: dict = field(default_factory=dict)
    prompt: str = ""
