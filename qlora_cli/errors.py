"""The one error type users see.

Library code raises :class:`UserError` with the bad value, where it is (recipe key with its YAML line, data
file and row) and the fix. The CLI renders it in one or two sentences and exits with code 2; everything else
is a bug and shows a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input that the user can fix.

    Args:
        message: what is wrong, naming the bad value.
        where: where it is, e.g. ``recipe.yaml:12 lora.r`` or ``data/train.csv row 41``.
        fix: what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.message = message.rstrip(".")
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}." if self.where else f"{self.message}."
        if self.fix:
            fix = self.fix.rstrip(".")
            text += f" {fix}" if fix.endswith(("?", "!")) else f" {fix}."
        return text


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None
