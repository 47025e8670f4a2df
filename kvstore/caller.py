"""Who is calling: the token of the RPC being served, for the answers that must reveal only
what that token's scopes cover (docs/security.md, "Isolation").

kvstore/server/auth.py sets it once a call's token checked out, in the call's own task (each
RPC runs in one, with its own copy of the context), so the store, Explain and the servicers
read it for the rest of that call. Without a tokens file nothing sets it: every caller is the
daemon's own user, who may see everything (`None`).
"""

from __future__ import annotations

from contextvars import ContextVar

from kvstore.tokens import ALL, READ, Token

CALLER: ContextVar[Token | None] = ContextVar("kvstore_caller", default=None)


def token() -> Token | None:
    return CALLER.get()


def sees(namespace: str, scope: str = READ) -> bool:
    """Whether the caller may learn about `namespace`: it holds `scope` there (read: it could
    find out as much with a Lookup or GetNamespace)."""
    t = CALLER.get()
    return t is None or t.allows(scope, namespace)


def sees_all(scope: str = READ) -> bool:
    """Whether the caller holds `scope` on every namespace ("*"): daemon-wide state is its."""
    t = CALLER.get()
    return t is None or t.allows(scope, ALL)


def client_key(client_name: str, pid: int, pid_ns: int) -> str:
    """The client a session counts against (server.max_sessions_per_client): its token when the
    daemon has tokens, else the process it says it is (pid and pid namespace), else its name."""
    t = CALLER.get()
    if t is not None:
        return f"token {t.name!r}"
    if pid:
        return f"pid {pid}" + (f" (pid namespace {pid_ns})" if pid_ns else "")
    return f"client {client_name[:128]!r}"
