"""Pictograms shown beside the words (inline SVG, so the kiosk needs nothing from outside).

The ``icon`` macro in ``templates/_macros.html`` wraps these paths; they are fixed markup,
never a value from outside, so they are marked safe here once.
"""

from __future__ import annotations

from markupsafe import Markup

_PATHS = {
    "globe": '<circle cx="12" cy="12" r="9"/><path d="M3 12h18M12 3c3 3.5 3 14.5 0 18M12 3c-3 3.5-3 14.5 0 18"/>',
    "barcode": '<path d="M4 5v14M7 5v14M9 5v14M12 5v14M15 5v14M17 5v14M20 5v14" stroke-width="2"/>',
    "key": '<circle cx="8" cy="12" r="4"/><path d="M12 12h9M18 12v3M21 12v3"/>',
    "document": '<path d="M6 3h8l4 4v14H6z"/><path d="M14 3v4h4M9 12h6M9 15h6M9 18h4"/>',
    "printer": '<path d="M7 8V3h10v5"/><rect x="3" y="8" width="18" height="9" rx="1"/><path d="M7 14h10v7H7z"/>',
    "clock": '<circle cx="12" cy="12" r="9"/><path d="M12 7v5l3 3"/>',
    "help": '<circle cx="12" cy="7" r="3"/><path d="M5 21c0-4 3-7 7-7s7 3 7 7"/>',
    "home": '<path d="M3 11l9-8 9 8M5 10v11h5v-6h4v6h5V10"/>',
    "check": '<circle cx="12" cy="12" r="9"/><path d="M7 12l3 3 7-7"/>',
    "warning": '<path d="M12 3l10 18H2z"/><path d="M12 10v5M12 18v.5"/>',
    "back": '<path d="M21 6H9l-6 6 6 6h12z"/><path d="M12 10l4 4M16 10l-4 4"/>',
    "next": '<path d="M5 12h14M13 6l6 6-6 6"/>',
    "eye": '<path d="M2 12s4-7 10-7 10 7 10 7-4 7-10 7S2 12 2 12z"/><circle cx="12" cy="12" r="3"/>',
    "eye-off": '<path d="M2 12s4-7 10-7 10 7 10 7-4 7-10 7S2 12 2 12z"/><path d="M4 4l16 16"/>',
    "hand": '<path d="M8 13V5a2 2 0 0 1 4 0v6M12 11V4a2 2 0 0 1 4 0v7M16 11V6a2 2 0 0 1 4 0v8a7 7 0 0 1-14 0v-2a2 2 0 0 1 2-2"/>',
}
ICON_PATHS: dict[str, Markup] = {name: Markup(path) for name, path in _PATHS.items()}
