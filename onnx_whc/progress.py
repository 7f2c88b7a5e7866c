"""Progress on stderr: a bar on a terminal, one line per stage in a log."""

from __future__ import annotations

import sys
from typing import Iterable

import click


def progress_bar(enabled: bool, label: str):
    """A wrapper that shows a progress bar on stderr over an iterable, or does nothing."""

    def wrap(items: Iterable):
        items = list(items)
        if not enabled or not items:
            return items
        return _bar(items, label)

    return wrap


def _bar(items, label):
    if not sys.stderr.isatty():  # a log, not a terminal: one line, not a bar redrawn into it
        click.echo(f"{label} ({len(items)})", err=True)
        yield from items
        return
    with click.progressbar(items, label=label, file=sys.stderr, show_pos=True) as bar:
        yield from bar
