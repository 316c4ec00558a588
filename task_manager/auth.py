"""Who is calling and what they may do: roles, credentials, per-principal limits.

Pure Python, no gRPC: service.py takes the bearer token or the client certificate's names
off a call and asks `Credentials` for a `Caller`; the lifecycle asks the Caller whether it
may touch a task, and who the author of its change is.

Tokens look like `tmk_<credential id>_<secret>`. Only a SHA-256 of the secret is stored:
the secret is 256 random bits, so a slow password hash would add latency and no safety.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from storage.base import Credential
from task_manager.clock import Clock
from task_manager.errors import (
    CredentialRevoked,
    PermissionDenied,
    TooManyRequests,
    Unauthenticated,
)
from task_manager.v1.task_manager_pb2 import Principal, System, User


class Role(StrEnum):
    OPERATOR = "operator"
    AGENT = "agent"
    VIEWER = "viewer"
    ADMIN = "admin"


_ALL = frozenset(Role)
RIGHTS: Mapping[str, frozenset[Role]] = {
    "CreateTask": frozenset({Role.OPERATOR, Role.ADMIN}),
    "UpdateTask": frozenset({Role.OPERATOR, Role.ADMIN}),
    "CancelTask": frozenset({Role.OPERATOR, Role.ADMIN}),
    "CompleteTask": frozenset({Role.OPERATOR, Role.ADMIN}),
    "QueryTasks": frozenset({Role.OPERATOR, Role.VIEWER, Role.ADMIN}),
    "WatchTasks": frozenset({Role.OPERATOR, Role.VIEWER, Role.ADMIN}),
    # Agents may read only the tasks assigned to their entity ids (checked per task).
    "GetTask": _ALL,
    "GetTaskHistory": _ALL,
    "ListenAsAgent": frozenset({Role.AGENT, Role.ADMIN}),
    "UpdateStatus": frozenset({Role.AGENT, Role.ADMIN}),
    "ReportStatus": frozenset({Role.AGENT, Role.ADMIN}),
    "ListAgents": frozenset({Role.VIEWER, Role.ADMIN}),
    "SubmitSessions": frozenset({Role.OPERATOR, Role.ADMIN}),
    "CancelSession": frozenset({Role.OPERATOR, Role.ADMIN}),
    "GetSession": frozenset({Role.OPERATOR, Role.VIEWER, Role.ADMIN}),
    "RegisterTaskType": frozenset({Role.OPERATOR, Role.ADMIN}),
    # Payloads by digest. Agents upload outputs, and read only the inputs of their own
    # tasks (checked per task).
    "UploadPayload": frozenset({Role.OPERATOR, Role.AGENT, Role.ADMIN}),
    "DownloadPayload": _ALL,
    "StatPayload": _ALL,
    "AttachInput": frozenset({Role.OPERATOR, Role.ADMIN}),
    "AttachOutput": frozenset({Role.AGENT, Role.ADMIN}),
    # Agents read the types they run too.
    "GetTaskType": _ALL,
    "ListTaskTypes": _ALL,
    "AddCredential": frozenset({Role.ADMIN}),
    "ListCredentials": frozenset({Role.ADMIN}),
    "RevokeCredential": frozenset({Role.ADMIN}),
}
"""Which roles may call each RPC."""

TOKEN_PREFIX = "tmk"
TOKEN = "token"
CERTIFICATE = "certificate"


@dataclass(frozen=True)
class Caller:
    """An authenticated principal with its role; ANONYMOUS when authentication is off."""

    principal: str
    role: Role
    entity_ids: frozenset[str] = frozenset()
    credential_id: str = ""
    """The credential this call came with; empty when authentication is off."""
    scopes: frozenset[str] = frozenset()
    """The only scopes whose tasks and sessions this caller may touch; empty: any."""

    @property
    def authenticated(self) -> bool:
        return bool(self.credential_id)

    def check_method(self, method: str) -> None:
        if self.role not in RIGHTS[method]:
            raise PermissionDenied(f"{self.role} {self.principal!r} may not call {method}")

    def check_entity(self, entity_id: str | None, action: str, subject: str) -> None:
        """An agent acts only for its own entity ids; other roles are not bound to any.
        (The message is built only for a refusal: this runs on every status update.)"""
        if self.role is Role.AGENT and entity_id not in self.entity_ids:
            owner = f"entity {entity_id!r}" if entity_id else "no agent"
            raise PermissionDenied(
                f"agent {self.principal!r} may not {action} {subject}: it belongs to {owner},"
                f" and this token acts for {sorted(self.entity_ids)}"
            )

    @property
    def default_scope(self) -> str:
        """The scope an id given without one is read in: the caller's only scope."""
        if len(self.scopes) == 1:
            (only,) = self.scopes
            return only
        return ""

    def check_scope(self, scope: str, subject: str) -> None:
        """A caller limited to scopes touches only the tasks and sessions in them
        (subject: what is in the scope, for the message)."""
        if self.scopes and scope not in self.scopes:
            where = f"scope {scope!r}" if scope else "no scope"
            raise PermissionDenied(
                f"{self.role} {self.principal!r} may not touch {subject}: it is in {where},"
                f" and this credential is limited to {sorted(self.scopes)}"
            )

    def visible_scopes(self, wanted: frozenset[str] | None) -> frozenset[str] | None:
        """The scopes a query or watch may read: those wanted (None: any), within the
        caller's own."""
        if not self.scopes:
            return wanted
        if wanted is None:
            return self.scopes
        for scope in sorted(wanted - self.scopes):
            raise PermissionDenied(
                f"{self.role} {self.principal!r} may not read scope {scope!r}: this"
                f" credential is limited to {sorted(self.scopes)}"
            )
        return wanted

    def author(self, claimed: Principal | None, entity_id: str | None = None) -> Principal | None:
        """The author recorded for a change this caller makes (to a task assigned to
        entity_id). With authentication on it is the caller itself: a claimed author must
        name the caller (an agent: one of its entity ids; anyone else: its principal as
        user_id), and a missing one is filled in."""
        if not self.authenticated:
            return claimed
        if claimed is None:
            if self.role is Role.AGENT:
                own = entity_id if entity_id in self.entity_ids else min(self.entity_ids)
                return Principal(system=System(entity_id=own))
            return Principal(user=User(user_id=self.principal))
        kind = claimed.WhichOneof("agent")
        if self.role is Role.AGENT:
            if kind == "system" and claimed.system.entity_id in self.entity_ids:
                return claimed
        elif kind == "user" and claimed.user.user_id == self.principal:
            return claimed
        raise PermissionDenied(
            f"author names someone other than {self.principal!r}: leave it unset and the"
            " task manager records who you are"
        )


ANONYMOUS = Caller("anonymous", Role.ADMIN)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(
    principal: str,
    role: Role,
    entity_ids: Sequence[str],
    now_ns: int,
    scopes: Sequence[str] = (),
) -> tuple[Credential, str]:
    """A new bearer token: the credential to store, and the token text to hand out once."""
    credential_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    credential = Credential(
        credential_id,
        TOKEN,
        principal,
        role.value,
        tuple(entity_ids),
        hash_secret(secret),
        now_ns,
        scopes=tuple(scopes),
    )
    return credential, f"{TOKEN_PREFIX}_{credential_id}_{secret}"


def certificate_binding(
    principal: str,
    role: Role,
    entity_ids: Sequence[str],
    now_ns: int,
    scopes: Sequence[str] = (),
) -> Credential:
    """Gives the client certificates naming principal (CN or SAN) a role."""
    return Credential(
        secrets.token_hex(6),
        CERTIFICATE,
        principal,
        role.value,
        tuple(entity_ids),
        "",
        now_ns,
        scopes=tuple(scopes),
    )


SCOPED_ROLES = frozenset({Role.OPERATOR, Role.VIEWER})
"""The roles a credential may be limited to scopes for: an agent is bound by its entity
ids (a task's scope neither widens nor narrows what its assignee sees), an admin by none."""


def check_binding(role: Role, entity_ids: Sequence[str], scopes: Sequence[str] = ()) -> None:
    """An agent credential acts for at least one entity id; other roles for none. Only
    operators and viewers may be limited to scopes."""
    if role is Role.AGENT and not entity_ids:
        raise ValueError("an agent credential needs at least one entity id (--entity)")
    if role is not Role.AGENT and entity_ids:
        raise ValueError(f"only agent credentials act for entity ids, not {role}")
    if scopes and role not in SCOPED_ROLES:
        raise ValueError(f"only operator and viewer credentials are limited to scopes, not {role}")


class Credentials:
    """The credentials in force, reloaded from the store as they change."""

    def __init__(self, client_certificates: bool = False) -> None:
        self._client_certificates = client_certificates
        self._tokens: dict[str, Credential] = {}
        self._certificates: dict[str, Credential] = {}
        self._any_stored = False

    @property
    def required(self) -> bool:
        """Authentication is on once any credential was ever stored (revoking them all
        locks everyone out, it never opens the server) or client certificates are checked."""
        return self._any_stored or self._client_certificates

    def replace(self, stored: Iterable[Credential]) -> set[str]:
        """Takes the stored credentials as the new truth; returns the ids of those that were
        in force and no longer are (their open streams must end). When authentication
        turns on, that includes ANONYMOUS's empty id."""
        before = {c.credential_id for c in (*self._tokens.values(), *self._certificates.values())}
        if not self.required:
            before.add(ANONYMOUS.credential_id)
        rows = list(stored)
        self._any_stored = self._any_stored or bool(rows)
        active = [row for row in rows if row.revoked_ns is None]
        self._tokens = {row.credential_id: row for row in active if row.kind == TOKEN}
        self._certificates = {row.principal: row for row in active if row.kind == CERTIFICATE}
        after = {row.credential_id for row in active}
        if not self.required:
            after.add(ANONYMOUS.credential_id)
        return before - after

    def by_token(self, token: str) -> Caller:
        prefix, _, rest = token.partition("_")
        credential_id, _, secret = rest.partition("_")
        credential = self._tokens.get(credential_id) if prefix == TOKEN_PREFIX else None
        # compare_digest: the time taken says nothing about how much of the hash matched.
        if credential is None or not hmac.compare_digest(
            credential.secret_hash, hash_secret(secret)
        ):
            raise Unauthenticated("the bearer token is not valid (unknown, revoked or mistyped)")
        return _caller(credential)

    def by_certificate(self, names: Sequence[str]) -> Caller:
        for name in names:
            credential = self._certificates.get(name)
            if credential is not None:
                return _caller(credential)
        raise Unauthenticated(
            f"the client certificate names {list(names)}, and none of them is given a role"
            " (task-manager tokens add --certificate)"
        )


def _caller(credential: Credential) -> Caller:
    return Caller(
        credential.principal,
        Role(credential.role),
        frozenset(credential.entity_ids),
        credential.credential_id,
        frozenset(credential.scopes),
    )


# -- limits ---------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    refilled_ns: int


class RateLimiter:
    """A token bucket per principal: `per_second` tokens a second (requests, or bytes
    uploaded), bursts up to one second's worth."""

    def __init__(self, per_second: float, clock: Clock) -> None:
        self._per_second = per_second
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, principal: str) -> None:
        """Takes one request's token, or raises TooManyRequests saying when to retry."""
        wait_s = self.reserve(principal)
        if wait_s > 0:
            self._refund(principal)
            raise TooManyRequests(
                f"{principal!r} is over its limit of {self._per_second:g} requests per"
                f" second: retry in {wait_s:.3f} s",
                wait_s,
            )

    def reserve(self, principal: str, tokens: float = 1.0) -> float:
        """Takes tokens, going into debt if need be; returns how long the caller must
        wait before it is within the limit (0: now). Streams pace with this."""
        now_ns = self._clock.now_ns()
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = self._buckets[principal] = _Bucket(self._per_second, now_ns)
        elapsed_s = (now_ns - bucket.refilled_ns) / 1e9
        bucket.tokens = min(self._per_second, bucket.tokens + elapsed_s * self._per_second)
        bucket.refilled_ns = now_ns
        bucket.tokens -= tokens
        return 0.0 if bucket.tokens >= 0 else -bucket.tokens / self._per_second

    def _refund(self, principal: str) -> None:
        self._buckets[principal].tokens += 1


@dataclass
class OpenStreams:
    """Open streams by principal (for the per-principal limit) and by credential (to end
    them when the credential is revoked)."""

    limit: int
    _count: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    _ends: defaultdict[str, dict[object, Callable[[Exception], None]]] = field(
        default_factory=lambda: defaultdict(dict)
    )

    @contextmanager
    def open(self, caller: Caller, end: Callable[[Exception], None]) -> Iterator[None]:
        """Counts a stream while it is open; `end` is called if its credential is revoked."""
        if self._count[caller.principal] >= self.limit:
            raise TooManyRequests(
                f"{caller.principal!r} already has {self.limit} open streams, the most"
                " allowed: close one first",
                1.0,
            )
        key = object()
        self._count[caller.principal] += 1
        self._ends[caller.credential_id][key] = end
        try:
            yield
        finally:
            self._count[caller.principal] -= 1
            if not self._count[caller.principal]:
                del self._count[caller.principal]
            ends = self._ends[caller.credential_id]
            del ends[key]
            if not ends:
                del self._ends[caller.credential_id]

    def revoke(self, credential_ids: Iterable[str]) -> int:
        """Ends every open stream of these credentials; returns how many."""
        ended = 0
        for credential_id in credential_ids:
            for end in list(self._ends.get(credential_id, {}).values()):
                end(CredentialRevoked("the credentials of this stream were revoked"))
                ended += 1
        return ended
