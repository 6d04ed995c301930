"""API keys for the HTTP service: the ``X-API-Key`` header, checked in constant time.

The earlier deployment read its keys from ``WAN2_API_KEYS``; ``STORYSTUDIO_API_KEYS``
is the new name. Both are comma-separated lists and both are honoured, so an old
``.env`` keeps working. A missing header is 401, a wrong key 403, both as
``{"detail": ...}``. ``/`` and ``/health`` are public: a client must be able to learn
whether auth is on before it has a key, and a load balancer probes ``/health``.

The check is an ASGI middleware, not a FastAPI dependency, because FastAPI reads and
parses a request body *before* it solves dependencies: a client without a key could
otherwise make the service spool a large upload before being turned away.

Without any key the service is open, which :func:`check_bind` allows only on a
loopback address unless the operator says otherwise (``--allow-unauthenticated`` or
``STORYSTUDIO_ALLOW_UNAUTHENTICATED=1``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

HEADER = "x-api-key"
KEY_ENV_VARS = ("STORYSTUDIO_API_KEYS", "WAN2_API_KEYS")
ANONYMOUS = "anonymous"
SCOPE_KEY = "storystudio.api_key"  # where the middleware leaves the caller's key label


@dataclass(frozen=True)
class ApiKey:
    """One accepted key. ``label`` names it in logs and in the job table, never the secret."""

    label: str
    secret: bytes = field(repr=False)


class KeyRing:
    """The accepted keys; :meth:`match` compares against every one in constant time."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KeyRing:
        """Keys from ``STORYSTUDIO_API_KEYS`` and ``WAN2_API_KEYS`` (comma-separated, blanks ignored).

        Each key is labelled ``<VAR>#<n>`` (1-based) so logs and the job table can say
        which key submitted a job without ever holding the key itself.
        """
        keys: list[ApiKey] = []
        seen: set[bytes] = set()
        for var in KEY_ENV_VARS:
            parts = [p.strip() for p in env.get(var, "").split(",")]
            for n, part in enumerate((p for p in parts if p), start=1):
                secret = part.encode("utf-8")
                if secret in seen:
                    continue
                seen.add(secret)
                keys.append(ApiKey(f"{var}#{n}", secret))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def match(self, given: str) -> ApiKey | None:
        """The key equal to ``given``, comparing against *all* keys so timing says nothing."""
        candidate = given.encode("utf-8", "surrogateescape")
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.secret) and found is None:
                found = key
        return found


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


class UnsafeBind(Exception):
    """Refusing to serve without keys on a non-loopback address."""


def check_bind(host: str, keys: KeyRing, allow_unauthenticated: bool) -> None:
    """Raise :class:`UnsafeBind` unless binding ``host`` is safe or explicitly allowed; log the outcome."""
    if keys.enabled:
        log.info("API keys: %d configured (%s); X-API-Key required", len(keys.keys),
                 ", ".join(k.label for k in keys.keys))
        return
    if is_loopback(host):
        log.warning("no API key configured (STORYSTUDIO_API_KEYS / WAN2_API_KEYS): serving WITHOUT "
                    "authentication, reachable from this machine only (%s)", host)
        return
    if allow_unauthenticated:
        log.warning("no API key configured: serving WITHOUT authentication on %s because "
                    "--allow-unauthenticated / STORYSTUDIO_ALLOW_UNAUTHENTICATED is set; anyone who "
                    "reaches this port can use the GPU", host)
        return
    raise UnsafeBind(
        f"refusing to serve on {host} without an API key: set STORYSTUDIO_API_KEYS (or WAN2_API_KEYS), "
        "bind a loopback address (--host 127.0.0.1), or pass --allow-unauthenticated "
        "(STORYSTUDIO_ALLOW_UNAUTHENTICATED=1) to run open on purpose"
    )


async def _deny(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Pure ASGI: checks ``X-API-Key`` before any routing or body reading.

    Puts the caller's key label into ``scope[SCOPE_KEY]`` (``"anonymous"`` when auth is
    off) for the per-key concurrency limit.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing, public_paths: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.keys.enabled:
            scope[SCOPE_KEY] = ANONYMOUS
        elif scope["path"] not in self.public_paths:
            given = [v for k, v in scope.get("headers", []) if k.lower() == HEADER.encode()]
            if not given:
                await _deny(send, 401, "missing API key: send it in the X-API-Key header")
                return
            key = self.keys.match(given[0].decode("latin-1"))
            if key is None:
                log.warning("rejected a request to %s with a wrong API key", scope["path"])
                await _deny(send, 403, "invalid API key")
                return
            scope[SCOPE_KEY] = key.label
        await self.app(scope, receive, send)
