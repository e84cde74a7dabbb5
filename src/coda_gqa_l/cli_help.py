"""How the console scripts print ``--help``: every option says its default.

``HelpFormatter`` appends ``(default: X)`` to an option's help unless the text already names its
default (many say more than the value: "default $CODA_GQA_L_THREADS, else the cores not busy").
Switches read ``(default: off)``.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return f"{text} (default: {describe_default(action.default)})"


def describe_default(value: object) -> str:
    """A default as a user would type it; ``%`` escaped for argparse's formatting."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, (list, tuple)):
        shown = " ".join(str(v) for v in value) if value else "none"
    else:
        shown = str(value)
    return shown.replace("%", "%%")


def first_paragraph(doc: str | None) -> str | None:
    """A module docstring's first paragraph on one line: a description that does not stop mid-sentence."""
    if not doc:
        return None
    return " ".join(doc.strip().split("\n\n")[0].split())
