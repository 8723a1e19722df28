"""Outcomes of conformance checks: PASS, FAIL with a reason, SKIP with a reason."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

__all__ = ["CheckFailed", "CheckSkipped", "Outcome", "Result", "expect", "fail", "skip"]


class Outcome(Enum):
    """How a check ended."""

    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


class CheckFailed(Exception):
    """The back-end broke the rule a check tests; the message says how."""


class CheckSkipped(Exception):
    """The check does not apply (a feature not offered, a device it is not for)."""


def fail(reason: str) -> NoReturn:
    """End the running check with FAIL(``reason``).

    Raises:
        CheckFailed: always.
    """
    raise CheckFailed(reason)


def skip(reason: str) -> NoReturn:
    """End the running check with SKIP(``reason``).

    Raises:
        CheckSkipped: always.
    """
    raise CheckSkipped(reason)


def expect(condition: object, reason: str) -> None:
    """FAIL(``reason``) unless ``condition`` holds.

    Raises:
        CheckFailed: ``condition`` is false.
    """
    if not condition:
        raise CheckFailed(reason)


@dataclass(frozen=True, slots=True)
class Result:
    """One check's result."""

    check_id: str
    outcome: Outcome
    reason: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {"id": self.check_id, "outcome": self.outcome.value, "reason": self.reason,
                "seconds": round(self.seconds, 3)}
