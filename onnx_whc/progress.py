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


class Meter:
    """A bar over a share of the work done in [0, 1] with a short status after it (a line per status in a log)."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label, self.status, self.share = enabled, label, "", 0.0
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = click.progressbar(length=1000, label=label, file=sys.stderr,
                                          item_show_func=lambda _: self.status)
            self._bar.__enter__()
        elif enabled:
            click.echo(label, err=True)

    def update(self, share: float, status: str | None = None) -> None:
        if not self.enabled:
            return
        changed = status is not None and status != self.status
        self.status = status if status is not None else self.status
        if self._bar is not None:
            self._bar.update(max(0, int(1000 * share) - int(1000 * self.share)))
        elif changed:
            click.echo(f"  {self.label}: {share:.0%}, {self.status}", err=True)
        self.share = max(self.share, share)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
