"""Every error type lwm-data raises on purpose, in one place, with no Beam (the trainer imports it).

Two families:
- `UserError`: something the user can change (a setting, a path, an input from the wrong stage).
  The commands print its message as one line and exit 2, never a traceback; anything else that
  escapes is a bug and keeps its traceback.
- `Rejection`: why one input record cannot be used. Jobs never fail on it: it becomes a dead letter
  (`DeadLetter`, one JSON line in the output's errors/), counted by its reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

RECORD_EXCERPT_CHARS = 1000


class UserError(Exception):
    """An error the user can fix; its message says what to change."""


class ConfigError(UserError, ValueError):
    """A setting or an input that cannot work."""


class NotAStageOutput(UserError, FileNotFoundError):
    """A directory without manifest.json: no stage has finished writing there."""


class WrongInput(ConfigError):
    """An input that is not what the command reads: nothing there, or another stage's output."""


class TooManyDeadLetters(UserError):
    """A stage dead-lettered more of its input than `--max-dead-fraction` allows; nothing was committed."""


class UnbalancedCounts(RuntimeError):
    """A stage's counts do not balance (in != out + filtered + dead-lettered): a bug in lwm-data,
    raised before anything is committed."""


def excerpt(record: Any) -> str:
    """The start of a bad record, as text, for its dead letter."""
    if isinstance(record, bytes):
        record = record[: 4 * RECORD_EXCERPT_CHARS].decode("utf-8", "replace")
    elif not isinstance(record, str):
        record = json.dumps(record, ensure_ascii=False, default=str) if isinstance(record, dict) else repr(record)
    return record[:RECORD_EXCERPT_CHARS]


@dataclass(eq=False)
class Rejection(Exception):
    """Why a record cannot be used: the one way to say so, whether returned, yielded or raised.

    `reason` is a short machine-readable class ("invalid_json") that counts are kept by; `source`
    and `locator` say where the record came from (file and line, book and chunk, ...) and may be
    filled in by the caller that knows (`at`).
    """

    reason: str
    detail: str = ""
    record: str = ""
    source: str = ""
    locator: str = ""

    def __post_init__(self):
        super().__init__(f"{self.reason}: {self.detail}")
        self.record = excerpt(self.record)

    def at(self, source: Any, locator: Any = "", record: Any = None) -> Rejection:
        """This rejection with its place filled in where it is still empty."""
        return replace(
            self,
            source=self.source or str(source),
            locator=self.locator or str(locator),
            record=self.record or ("" if record is None else excerpt(record)),
        )

    def dead_letter(self, stage: str) -> DeadLetter:
        return DeadLetter(stage, self.reason, self.source, self.locator, self.detail, self.record)


@dataclass
class DeadLetter:
    """One bad input record as written to errors/: where it came from and why it was rejected."""

    stage: str
    reason: str  # a short machine-readable class, e.g. "invalid_json"
    source: str  # input file (or upstream id)
    locator: str = ""  # line number, byte offset, row, or chunk id within source
    detail: str = ""  # human-readable explanation
    record: str = ""  # excerpt of the offending record

    def to_json(self) -> str:
        fields = asdict(self)
        fields["record"] = fields["record"][:RECORD_EXCERPT_CHARS]
        line = json.dumps(fields, ensure_ascii=False)
        try:
            line.encode()
        except UnicodeEncodeError:  # lone surrogates (from JSON input): escape them, or no sink can write it
            line = json.dumps(fields)
        return line
