"""Typed rows at the query boundary (edge.store.rows): the rows a select gives, and a reader that drifted."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from peewee import CharField, IntegerField, Model, SqliteDatabase, fn

from edge.store.rows import row, rows, rows_into

db = SqliteDatabase(":memory:")


class Shelf(Model):
    name = CharField()
    films = IntegerField()

    class Meta:
        database = db


@pytest.fixture(autouse=True)
def shelves() -> Iterator[None]:
    db.connect()
    db.create_tables([Shelf])
    Shelf.insert_many([("chest", 3), ("hand", 1), ("chest", 2)], fields=[Shelf.name, Shelf.films]).execute()
    yield
    db.close()


def test_rows_are_the_selected_columns_as_tuples() -> None:
    query = Shelf.select(Shelf.name, fn.SUM(Shelf.films)).group_by(Shelf.name).order_by(Shelf.name)
    assert dict(rows(query, tuple[str, int])) == {"chest": 5, "hand": 1}
    assert list(rows(Shelf.select(Shelf.name).where(Shelf.films > 5), tuple[str])) == []


def test_one_row_of_an_aggregate() -> None:
    assert row(Shelf.select(fn.COUNT(Shelf.id), fn.MAX(Shelf.films)), tuple[int, int]) == (3, 3)


def test_a_reader_that_expects_other_columns_fails_on_the_first_row() -> None:
    with pytest.raises(TypeError, match="selected 2 columns"):
        list(rows(Shelf.select(Shelf.name, Shelf.films), tuple[str]))
    with pytest.raises(TypeError, match="selected 1 columns"):
        row(Shelf.select(fn.COUNT(Shelf.id)), tuple[int, int])


@dataclass(frozen=True)
class ShelfLine:
    name: str
    films: int


def test_rows_into_a_dataclass_in_column_order() -> None:
    query = Shelf.select(Shelf.name, Shelf.films).where(Shelf.name == "hand")
    assert rows_into(query, ShelfLine) == [ShelfLine("hand", 1)]
