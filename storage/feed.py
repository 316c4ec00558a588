"""The change feed: how committed changes leave a store.

Every store has one. It carries each committed change once, in revision order, with no
gap, to every subscriber (the dispatcher, the watch hub, the timekeeper), and it is told
of a commit before the writer's caller is answered: whoever hears "done" can rely on
every stream having been offered the change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from storage.base import Change, StoreError

log = logging.getLogger(__name__)

TAIL_POLL_S = 1.0
"""How often a store whose feed also carries other servers' commits (PostgreSQL's tail)
reads them back when nothing woke it (`--tail-poll`): a lost notification (a LISTEN
connection that dropped) delays them this much at most."""

Subscriber = Callable[[Sequence[Change]], None]
"""Called on the event loop with committed changes, oldest first."""


class RevisionGap(StoreError):
    """A change arrived out of revision order. Revisions are dense and published in
    order, so this is a bug in a store, never something to skip past."""


class ChangeFeed:
    """Committed changes in revision order. `revision` is the high-water mark: every
    change up to it has been given to every subscriber, and none after it."""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """subscriber gets every change published from now on."""
        self._subscribers.append(subscriber)

    def publish(self, changes: Sequence[Change]) -> None:
        """Gives changes, which must follow `revision` without a gap, to every subscriber.

        Raises RevisionGap, publishing nothing, if they do not."""
        if not changes:
            return
        expected = self.revision + 1
        for change in changes:
            if change.revision != expected:
                raise RevisionGap(
                    f"change feed at revision {self.revision} was given revision"
                    f" {change.revision} where {expected} was due"
                )
            expected += 1
        self.revision = changes[-1].revision
        for subscriber in self._subscribers:
            try:
                subscriber(changes)
            except Exception:  # a bug in one subscriber must not starve the others
                log.exception(
                    "a subscriber failed on revisions %d to %d",
                    expected - len(changes),
                    self.revision,
                )
