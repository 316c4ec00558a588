"""Scoped ids: a source application's own task (and session) ids, unique within its scope.

A task created with scope "survey" and id "42" is stored under one canonical id,
"survey/42", and that string is its task_id everywhere: in every Task, event and agent
request, in the store, in the history. A client that knows only task_ids (a Lattice
client) therefore needs nothing new: it passes the canonical id back. A scoped client
may instead pass the id and its scope; both name the same task.

The mapping is one to one because neither part may contain the separator: an unscoped
id is [A-Za-z0-9_.-]{5,36} and a scope [A-Za-z0-9_.-]{1,63}, so "survey/42" can only be
scope "survey", id "42", and no unscoped id looks like a scoped one.
"""

from __future__ import annotations

import re

SEPARATOR = "/"
SCOPE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,63}")


def scope_of(canonical_id: str) -> str:
    """The scope a canonical id is in; empty for an unscoped id."""
    scope, separator, _ = canonical_id.partition(SEPARATOR)
    return scope if separator else ""


def canonical(scope: str, local_id: str) -> str:
    """The id a task (or session) of this scope is stored under."""
    return f"{scope}{SEPARATOR}{local_id}" if scope else local_id
