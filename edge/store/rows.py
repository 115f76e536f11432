"""Typed rows at the query boundary.

peewee's own stubs type ``query.tuples()`` as the model query it came from, so a loop over
the rows looks to mypy like a loop over model objects. The reader names the row it selected
(``rows(query, tuple[int, str])``): the type lives next to the columns, and a select that
drifts from it fails on the first row instead of unpacking into the wrong names.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from peewee import BaseQuery, SelectBase

Row = TypeVar("Row", bound=tuple[Any, ...])
Made = TypeVar("Made")


def rows(query: BaseQuery, shape: type[Row]) -> Iterator[Row]:
    """The query's rows as tuples of ``shape``; the width is checked on the first row."""
    width = _width(shape)
    checked = False
    for row in query.tuples():
        if not checked:
            _check(row, width, shape)
            checked = True
        yield row


def row(query: SelectBase, shape: type[Row]) -> Row:
    """The first row of an aggregate or single-row query (peewee's ``.get()``)."""
    found = query.tuples().get()
    _check(found, _width(shape), shape)
    return typing.cast(Row, found)


def rows_into(query: BaseQuery, make: Callable[..., Made]) -> list[Made]:
    """Each row spread into ``make`` (a dataclass whose fields are the selected columns, in order)."""
    return [make(*r) for r in query.tuples()]


def _width(shape: type[tuple[Any, ...]]) -> int | None:
    args = typing.get_args(shape)
    return None if not args or args[-1] is Ellipsis else len(args)


def _check(found: tuple[Any, ...], width: int | None, shape: object) -> None:
    if width is not None and len(found) != width:
        raise TypeError(f"query selected {len(found)} columns, reader expects {shape}")
