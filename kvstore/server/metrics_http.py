"""The metrics endpoint's HTTP server: prometheus_client's exposition, behind a bearer-token
check when the daemon has a tokens file (docs/security.md, "The metrics endpoint").

The metrics count every namespace and every tenant's calls, so with tokens they are served
only to a token with the read (or admin) scope on every namespace ("*"); Prometheus sends it
with `authorization` in its scrape config. No token or an unknown one: 401, the same words
either way; a known token without that scope: 403 naming the token. The secret is compared
in constant time (kvstore/tokens.py) and never logged.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from kvstore.tokens import ADMIN, ALL, READ, Tokens

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
UNAUTHORIZED = "the metrics need a valid bearer token (header `Authorization: Bearer <token>`)\n"


def refusal(authorization: str, tokens: Tokens) -> tuple[str, str] | None:
    """(HTTP status, why) when this Authorization header may not read the metrics, else None."""
    scheme, _, secret = authorization.partition(" ")
    token = tokens.find(secret.strip()) if scheme.lower() == "bearer" and secret.strip() else None
    if token is None:
        return "401 Unauthorized", UNAUTHORIZED
    if not (token.allows(READ, ALL) or token.allows(ADMIN, ALL)):
        return (
            "403 Forbidden",
            f"the metrics need the read (or admin) scope on every namespace ('*'); "
            f"token {token.name!r} does not have it\n",
        )
    return None


def guarded(app: App, tokens: Tokens) -> App:
    def check(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refused = refusal(environ.get("HTTP_AUTHORIZATION", ""), tokens)
        if refused is None:
            return app(environ, start_response)
        status, why = refused
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if status.startswith("401"):
            headers.append(("WWW-Authenticate", 'Bearer realm="kvstore metrics"'))
        start_response(status, headers)
        return [why.encode()]

    return check


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the daemon's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one a few seconds, forever)."""


def serve(registry: CollectorRegistry, host: str, port: int, tokens: Tokens | None) -> WSGIServer:
    """Serve /metrics on a thread of its own; `shutdown()` + `server_close()` stop it."""
    app: App = make_wsgi_app(registry)
    if tokens is not None:
        app = guarded(app, tokens)
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    httpd = make_server(host, port, app, server_class, _QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
