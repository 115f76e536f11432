"""Worklist wildcard matching: the same answers as a plain reference matcher, in time linear in key x value.

The matcher replaced a regex whose backtracking held the GIL for 10 s on one hostile key
(``*?*?*?*?*?*?*?*Q``) against one long name; these tests pin both its meaning and its speed.
"""

from __future__ import annotations

import fnmatch
import time
from functools import lru_cache

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.dicom.worklist import matches

ALPHABET = "aAbB^ -*?"  # letters in two cases, PN's component separator, a space, a hyphen, both wildcards
LONG_NAME = "Mahlangu-Ramaphosa-Nkosi^Nomvula Thandiwe Precious"


def reference(key: str, value: str, fold: bool = False) -> bool:
    """DICOM wildcard matching by memoised dynamic programming over (key index, value index)."""
    if fold:
        key, value = key.lower(), value.lower()
    if not key:
        return True  # an empty key is universal matching

    @lru_cache(maxsize=None)
    def at(k: int, v: int) -> bool:
        if k == len(key):
            return v == len(value)
        if key[k] == "*":
            return at(k + 1, v) or (v < len(value) and at(k, v + 1))
        return v < len(value) and (key[k] == "?" or key[k] == value[v]) and at(k + 1, v + 1)

    return at(0, 0)


def by_fnmatch(key: str, value: str) -> bool:
    """A second reference: fnmatch with everything but * and ? escaped (its [ ] mean nothing in DICOM)."""
    escaped = "".join(ch if ch in "*?" else f"[{ch}]" for ch in key)
    return not key or fnmatch.fnmatchcase(value, escaped)


@settings(max_examples=2000, deadline=None)
@given(key=st.text(ALPHABET, max_size=12), value=st.text(ALPHABET.replace("*", "").replace("?", ""), max_size=14),
       fold=st.booleans())
def test_matches_like_the_reference(key: str, value: str, fold: bool) -> None:
    assert matches(key, value, fold) == reference(key, value, fold)
    if not fold:
        assert matches(key, value) == by_fnmatch(key, value)


@settings(max_examples=500, deadline=None)
@given(value=st.text(ALPHABET, max_size=14), data=st.data())
def test_a_key_built_from_the_value_always_matches(value: str, data: st.DataObject) -> None:
    """Replace some characters of a value by ? and some runs by *: the value must match (in any case)."""
    key = ""
    i = 0
    while i < len(value):
        choice = data.draw(st.sampled_from(("keep", "keep", "?", "*")))
        if choice == "*":
            run = data.draw(st.integers(0, len(value) - i))
            key, i = key + "*", i + run
        else:
            key, i = key + ("?" if choice == "?" else value[i]), i + 1
    assert matches(key, value) or key == ""  # "" is universal anyway
    assert matches(key.upper(), value.lower(), fold=True)


def test_dicom_examples() -> None:
    assert matches("nkosi*", "Nkosi^Sipho", fold=True) and not matches("nkosi*", "Nkosi^Sipho")
    assert matches("*^Sipho", "Nkosi^Sipho") and matches("N?osi^*", "Nkosi^Sipho")
    assert not matches("N?osi", "Nkosi^Sipho") and matches("*", "") and matches("", "x")
    assert matches("**a**", "a") and not matches("?", "") and matches("a*b*c", "abbbbc")


def test_a_hostile_key_against_500_long_names_takes_well_under_half_a_second() -> None:
    """Before: one name took 10 s (regex backtracking). The precise figure is in bench/worklist_match.py."""
    names = [f"{LONG_NAME}{'' if i % 2 else ' '}{'x' * (i % 13)} {i}" for i in range(500)]
    for key in ("*?*?*?*?*?*?*?*Q", "*?" * 40 + "*Q", "*a*a*a*a*a*a*a*a*a*a*Q", "*" + "?*" * 50, "*?*?*?*?*?*?*?*1"):
        start = time.perf_counter()
        hits = sum(matches(key, name, fold=True) for name in names)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, (key, elapsed)
        assert [matches(key, n, fold=True) for n in names[:40]] == [reference(key, n, fold=True) for n in names[:40]]
        assert hits == (500 if key.startswith("*" + "?*" * 50) else 0 if key.endswith("Q") else 50)
