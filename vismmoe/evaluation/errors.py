"""The one error the harness raises for bad benchmark data."""

from __future__ import annotations

from ..errors import VismmoeError


class EvalDataError(VismmoeError, ValueError):
    """A dataset or predictions file cannot be used as it is.

    The message always names the file and, for a bad record, its index and id, so the user can fix
    the data or re-run with `skip_bad=True` (`--skip-bad`) to skip such records and count them.
    """

    def __init__(self, message: str, *, file=None, record=None, question_id=None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if record is not None:
            where.append(f"record {record}")
        if question_id is not None:
            where.append(f"question_id {question_id!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.file, self.record, self.question_id = file, record, question_id


class BadRecords:
    """Collects bad records: raises the first one, or with `skip=True` counts them and goes on."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.errors: list[str] = []

    def report(self, error: EvalDataError) -> None:
        if not self.skip:
            error.args = (f"{error.args[0]} (--skip-bad / skip_bad=True skips such records and counts them)",)
            raise error
        self.errors.append(str(error))

    def summary(self, examples: int = 20) -> dict:
        return {"count": len(self.errors), "examples": self.errors[:examples]}
