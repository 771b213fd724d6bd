"""Messages between the app's widgets (tiny dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from ..engine.spotlight import Ranked


@dataclass
class TestChosen(Message):
    """The user picked a test item (Enter in the test list, or a jump)."""

    index: int


@dataclass
class RowSelected(Message):
    """The highlighted row of the ranking changed."""

    row: Ranked | None


@dataclass
class ExampleChosen(Message):
    """The user asked for a training example's reverse spotlight (Enter on a ranked row)."""

    example: int


@dataclass
class ColumnsFitted(Message):
    """The ranking re-fitted its columns (a new ranking, or a new width): the header names
    the columns left out."""
