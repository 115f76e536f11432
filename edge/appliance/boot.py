"""systemd-boot entries for the two root slots (Boot Loader Specification, type 1).

How the entries are named, so that systemd-boot boots a new slot while it has tries left
and the old one once its tries are gone. The rule, read from systemd v252 (Debian
bookworm's systemd-boot-efi 252), ``src/boot/efi/boot.c`` at tag v252:

- An entry's id is its whole file name, lower-cased, *with* the boot counter:
  ``entry->id = xstrdup16(file); strtolower16(entry->id);`` (config_entry_add_type1,
  lines 1538-1539); the ``+LEFT[-DONE]`` before ``.conf`` only sets tries_left /
  tries_done (config_entry_parse_tries, line 1543). An entry without a counter has
  tries_left = -1 (never "out of tries").
- All entries are sorted with config_entry_compare (lines 1681-1733, applied at line
  2609): first every entry with ``tries_left == 0`` goes to the end (line 1688); then an
  entry with a ``sort-key`` goes before one without (line 1696); between two entries
  without a sort-key, by id *descending* with ``strverscmp_improved`` (line 1719), so the
  higher version-like id comes first; a tie is broken by more tries left, then fewer done.
- Without a ``default`` line in loader.conf, no ``LoaderEntryDefault`` /
  ``LoaderEntryOneShot`` EFI variable (``bootctl set-default`` / the menu's ``d`` key set
  one), config_default_entry_select boots the first entry of that order
  (``/* select the first suitable entry */``, line 1778).

So an entry is ``clinic-edge-<generation>-<slot>``, the generation a 4-digit number one
higher with every update: the new entry (``clinic-edge-0002-b+3.conf``) sorts before the
old (``clinic-edge-0001-a.conf``) while it has tries, after it once it is ``+0-3``, and
stays first once systemd-bless-boot renames it ``clinic-edge-0002-b.conf``. No entry may
carry ``sort-key`` (it would sort before every entry without one). The image's first entry
is ``clinic-edge-0001-a.conf`` (``python3 -m edge.appliance.boot --slot a --version V
--filename``). :func:`boot_order` is this rule in Python, so the node can say which slot
boots next and the tests can check the names against it.

Stdlib only (image/build.sh runs this with the host's python3).
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

KERNEL_OPTIONS = "rootfstype=squashfs ro console=tty0 console=ttyS0,115200 systemd.gpt_auto=0 panic=10"
SLOTS = ("a", "b")
ENTRY_PREFIX = "clinic-edge-"
FIRST_GENERATION = 1

_ENTRY_NAME = re.compile(r"^clinic-edge-(?:(?P<generation>\d+)-)?(?P<slot>[ab])(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf$")


def other_slot(slot: str) -> str:
    """The slot an update goes into: the one not running."""
    check_slot(slot)
    return "b" if slot == "a" else "a"


def check_slot(slot: str) -> None:
    if slot not in SLOTS:
        raise ValueError(f"slot must be a or b, not {slot!r}")


def entry_text(slot: str, version: str) -> str:
    """The entry that boots ``slot`` ("a" or "b"): its kernel, initrd and root on the ESP.

    No ``sort-key`` line, on purpose: see the module docstring.
    """
    check_slot(slot)
    return (
        f"title Clinic Edge {version} (slot {slot.upper()})\n"
        f"version {version}\n"
        f"linux /clinic-edge/{slot}/vmlinuz\n"
        f"initrd /clinic-edge/{slot}/initrd.img\n"
        f"options root=PARTLABEL=root-{slot} {KERNEL_OPTIONS} edge.slot={slot}\n"
    )


def entry_filename(slot: str, generation: int, tries: int | None = None) -> str:
    """``clinic-edge-0002-b+3.conf``: with a boot counter for an update, without for the first image."""
    check_slot(slot)
    if generation < 0:
        raise ValueError(f"generation must be >= 0, not {generation}")
    counter = "" if tries is None else f"+{tries}"
    return f"{ENTRY_PREFIX}{generation:04d}-{slot}{counter}.conf"


@dataclass(frozen=True)
class EntryName:
    """What a file name in /loader/entries says about one of our entries."""

    filename: str
    slot: str
    generation: int
    """0 for the early unnumbered name ``clinic-edge-a.conf``."""
    tries_left: int | None
    """None: no boot counter (a good entry); 0: out of tries (a bad entry)."""
    tries_done: int | None

    @property
    def counting(self) -> bool:
        return self.tries_left is not None


def parse_entry_name(filename: str) -> EntryName | None:
    """Our entry's name parsed; None for any other file (systemd-boot's own rules for the counter)."""
    match = _ENTRY_NAME.match(filename.lower())
    if match is None:
        return None
    left, done = match["left"], match["done"]
    return EntryName(
        filename=filename,
        slot=match["slot"],
        generation=int(match["generation"] or 0),
        tries_left=None if left is None else int(left),
        tries_done=None if left is None else int(done or 0),
    )


def next_generation(names: Sequence[EntryName]) -> int:
    """One more than any entry on the ESP, so the new entry sorts first (see the module docstring)."""
    return max((n.generation for n in names), default=FIRST_GENERATION - 1) + 1


# --- systemd v252's order, in Python -------------------------------------------------------


def _cmp(a: object, b: object) -> int:
    return (a > b) - (a < b)  # type: ignore[operator]


def _valid_version_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "~-^.")


def strverscmp_improved(a: str, b: str) -> int:
    """systemd's strverscmp_improved (src/fundamental/string-util-fundamental.c, v252 line 84)."""
    i = j = 0
    while True:
        while i < len(a) and not _valid_version_char(a[i]):
            i += 1
        while j < len(b) and not _valid_version_char(b[j]):
            j += 1
        ca, cb = a[i:i + 1], b[j:j + 1]
        if ca == "~" or cb == "~":
            r = _cmp(ca != "~", cb != "~")
            if r:
                return r
            i, j = i + 1, j + 1
            ca, cb = a[i:i + 1], b[j:j + 1]
        if not ca or not cb:
            return _cmp(ca, cb)
        for sep in "-^.":
            if ca == sep or cb == sep:
                r = _cmp(ca != sep, cb != sep)
                if r:
                    return r
                i, j = i + 1, j + 1
                ca, cb = a[i:i + 1], b[j:j + 1]
        if (ca.isascii() and ca.isdigit()) or (cb.isascii() and cb.isdigit()):
            ii, jj = i, j
            while ii < len(a) and a[ii].isascii() and a[ii].isdigit():
                ii += 1
            while jj < len(b) and b[jj].isascii() and b[jj].isdigit():
                jj += 1
            r = _cmp(ii != i, jj != j)
            if r:
                return r
            sa, sb = a[i:ii].lstrip("0"), b[j:jj].lstrip("0")
            r = _cmp(len(sa), len(sb)) or _cmp(sa, sb)
            if r:
                return r
        else:
            ii, jj = i, j
            while ii < len(a) and a[ii].isascii() and a[ii].isalpha():
                ii += 1
            while jj < len(b) and b[jj].isascii() and b[jj].isalpha():
                jj += 1
            n = min(ii - i, jj - j)
            r = _cmp(a[i:i + n], b[j:j + n]) or _cmp(ii - i, jj - j)
            if r:
                return r
        i, j = ii, jj


def _tries(filename: str) -> tuple[int, int]:
    """(tries_left, tries_done) as config_entry_parse_tries reads them; (-1, -1) without a counter."""
    stem = filename[: -len(".conf")] if filename.lower().endswith(".conf") else filename
    plus = stem.rfind("+")
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", stem[plus + 1:]) if plus >= 0 else None
    if match is None:
        return -1, -1
    return int(match[1]), int(match[2] or 0)


def _entry_compare(a: str, b: str) -> int:
    """config_entry_compare for two entries without sort-key (ours never have one)."""
    (a_left, a_done), (b_left, b_done) = _tries(a), _tries(b)
    r = _cmp(a_left == 0, b_left == 0)
    if r:
        return r
    r = -strverscmp_improved(a.lower(), b.lower())
    if r:
        return r
    if a_left < 0 or b_left < 0:
        return 0
    return -_cmp(a_left, b_left) or _cmp(a_done, b_done)


def boot_order(filenames: Sequence[str]) -> list[str]:
    """The entries in the order systemd-boot v252 lists them; the first is booted by default."""
    return sorted(filenames, key=functools.cmp_to_key(_entry_compare))


def default_entry(filenames: Sequence[str]) -> str | None:
    """The entry systemd-boot boots when nobody chose one (no default line, no EFI variable)."""
    order = boot_order(filenames)
    return order[0] if order else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="print a slot's boot entry (or, with --filename, its file name)")
    parser.add_argument("--slot", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--generation", type=int, default=FIRST_GENERATION,
                        help=f"the entry's generation (default {FIRST_GENERATION}: the image's first entry)")
    parser.add_argument("--filename", action="store_true",
                        help="print the entry's file name in /loader/entries instead (no boot counter)")
    args = parser.parse_args()
    if args.filename:
        print(entry_filename(args.slot, args.generation))
    else:
        print(entry_text(args.slot, args.version), end="")
