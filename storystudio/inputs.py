"""Fetch job inputs (images, audio, pose videos) from URLs, data: URIs or base64.

Every input field of a job is a string that is one of:

* an ``http://`` or ``https://`` URL, downloaded with hard limits;
* a ``data:`` URI (``data:audio/mpeg;base64,...``);
* raw base64 (standard or URL-safe alphabet, whitespace and missing padding tolerated).

Anything else that names a scheme (``file:``, ``ftp:``, ``gopher:`` ...) is refused.

Downloads are guarded against server-side request forgery: the host is resolved once,
**every** address it resolves to must be public (no loopback, link-local, private,
shared/CGNAT, reserved, multicast or unspecified address, for IPv4 and IPv6, including
IPv4 addresses embedded in IPv6 as IPv4-mapped, 6to4 or NAT64), and the connection is
then made to the validated address itself (the ``Host`` header, TLS SNI and certificate
check still use the host name). A DNS answer that changes between the check and the
connection (DNS rebinding) therefore cannot redirect the request. Redirects are followed
by hand, at most ``max_redirects`` times, and every hop is checked again. Proxies from
the environment are deliberately not used: a proxy would make the address check
meaningless.

Sizes are capped per kind: a ``Content-Length`` over the cap is refused before the body
is read, and the body is counted while it streams, so a server that lies about or omits
the length is cut off at the cap. Time is capped per connect, per read and in total.

All failures raise :class:`~storystudio.errors.InputFetchError` with a stable code:

``input_forbidden``        scheme or address not allowed, credentials in the URL
``input_download_failed``  HTTP status >= 400, timeout, connection error, bad URL, too many redirects
``input_too_large``        over the size cap of the kind
``input_invalid_base64``   malformed base64 or data: URI
``input_empty``            the source or the downloaded/decoded payload is empty

Messages name the job field (``field=``) and describe the source without its payload:
URLs lose their query string and user info and are cut to about 100 characters, base64
payloads are only counted.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field as dataclass_field
from typing import Literal

import urllib3
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from storystudio import __version__
from storystudio.errors import InputFetchError, InvalidInput

log = logging.getLogger(__name__)

Kind = Literal["image", "audio", "video"]

MIB = 1024 * 1024
_CHUNK = 64 * 1024
_SOURCE_CHARS = 100  # how much of a source a message may show
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = f"storystudio/{__version__}"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
# RFC 6052 well-known NAT64 prefix: the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class InputLimits:
    """Size, time and address limits for :func:`fetch_bytes`.

    ``allow_private`` lifts the address check entirely (local development, tests on
    127.0.0.1). ``allow_networks`` is the narrow alternative: CIDRs that are allowed even
    though they are not public, e.g. ``("10.1.2.0/24",)`` for an in-cluster object store;
    every other non-public address stays refused.
    """

    max_image_bytes: int = 20 * MIB
    max_audio_bytes: int = 50 * MIB
    max_video_bytes: int = 100 * MIB
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 120.0
    max_redirects: int = 3
    allow_private: bool = False
    allow_networks: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = dataclass_field(
        init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_audio_bytes", "max_video_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"InputLimits.{name} must be > 0, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"InputLimits.{name} must be > 0, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ValueError(f"InputLimits.max_redirects must be >= 0, got {self.max_redirects}")
        object.__setattr__(self, "allow_networks", tuple(self.allow_networks))
        object.__setattr__(self, "_networks", _parse_networks(self.allow_networks))

    def max_bytes(self, kind: Kind) -> int:
        try:
            return {"image": self.max_image_bytes, "audio": self.max_audio_bytes,
                    "video": self.max_video_bytes}[kind]
        except KeyError:
            raise ValueError(f"unknown input kind {kind!r} (image, audio or video)") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> InputLimits:
        """Limits from ``STORYSTUDIO_*`` variables; unset variables keep the defaults.

        ``STORYSTUDIO_MAX_IMAGE_MB`` / ``_AUDIO_MB`` / ``_VIDEO_MB`` (MiB, decimals allowed),
        ``STORYSTUDIO_DOWNLOAD_TIMEOUT_S`` (total time per download),
        ``STORYSTUDIO_ALLOW_PRIVATE_URLS`` (``1``/``true``/``yes``/``on`` or ``0``/``false``/...),
        ``STORYSTUDIO_ALLOW_NETWORKS`` (comma-separated CIDRs). A malformed value raises
        :class:`ValueError` naming the variable, so a bad deployment fails at start-up.
        """
        kwargs: dict[str, object] = {}

        def number(var: str) -> float | None:
            raw = env.get(var, "").strip()
            if not raw:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number") from None
            if not value > 0:
                raise ValueError(f"{var}={raw!r} must be > 0")
            return value

        for var, name in (("STORYSTUDIO_MAX_IMAGE_MB", "max_image_bytes"),
                          ("STORYSTUDIO_MAX_AUDIO_MB", "max_audio_bytes"),
                          ("STORYSTUDIO_MAX_VIDEO_MB", "max_video_bytes")):
            mb = number(var)
            if mb is not None:
                kwargs[name] = max(1, int(mb * MIB))
        total = number("STORYSTUDIO_DOWNLOAD_TIMEOUT_S")
        if total is not None:
            kwargs["total_timeout_s"] = total
        raw = env.get("STORYSTUDIO_ALLOW_PRIVATE_URLS", "").strip().lower()
        if raw in _TRUE:
            kwargs["allow_private"] = True
        elif raw not in _FALSE:
            raise ValueError(f"STORYSTUDIO_ALLOW_PRIVATE_URLS={raw!r}: use 1/true or 0/false")
        nets = tuple(n.strip() for n in env.get("STORYSTUDIO_ALLOW_NETWORKS", "").split(",") if n.strip())
        if nets:
            try:
                _parse_networks(nets)
            except ValueError as exc:
                raise ValueError(f"STORYSTUDIO_ALLOW_NETWORKS: {exc}") from None
            kwargs["allow_networks"] = nets
        return cls(**kwargs)  # type: ignore[arg-type]


def _parse_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs as networks; a malformed one raises ValueError naming it."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


# --------------------------------------------------------------------------- helpers


def _error(code: str, message: str, field: str | None) -> InputFetchError:
    return InputFetchError(f"{field}: {message}" if field else message, code=code)


def _clip(text: str, limit: int = _SOURCE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def describe_source(source: str) -> str:
    """A short, payload-free description of an input string, safe for messages and logs."""
    s = source.strip()
    low = s[:8].lower()
    if low.startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(s)
            netloc = parts.netloc.rpartition("@")[2]
            shown = f"{parts.scheme}://{netloc}{parts.path}" + ("?\u2026" if parts.query else "")
        except ValueError:
            shown = s.split("?", 1)[0]
        return _clip(shown)
    if low.startswith("data:"):
        head = s.split(",", 1)[0]
        return f"{_clip(head, 60)},\u2026 ({len(s)} chars)"
    m = _SCHEME_RE.match(s)
    if m:
        return _clip(s.split("?", 1)[0])
    return f"base64 payload ({len(s)} chars)"


def address_forbidden(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` must not be fetched from, or ``None`` if it is a public unicast address."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_forbidden(embedded)
            return f"an IPv6 address embedding {embedded} ({why})" if why else None
    for attr, why in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                      ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                      ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(addr, attr):
            return f"a {why} address"
    if not addr.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return "not a public address"
    return None


def _address_refusal(ip: str, limits: InputLimits) -> str | None:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if limits.allow_private:
        return None
    if any(addr in net for net in limits._networks):
        return None
    return address_forbidden(addr)


# --------------------------------------------------------------------------- base64


def _b64decode(text: str, *, max_bytes: int, field: str | None, what: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    if not compact:
        raise _error("input_empty", f"{what} is empty", field)
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise _error("input_too_large",
                     f"{what} decodes to about {len(compact) // 4 * 3} bytes, over the limit of "
                     f"{max_bytes} bytes", field)
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    missing = -len(compact) % 4
    if missing == 3:
        raise _error("input_invalid_base64", f"{what} is not valid base64 (bad length)", field)
    try:
        data = base64.b64decode(compact + "=" * missing, validate=True)
    except (binascii.Error, ValueError):
        raise _error("input_invalid_base64",
                     f"{what} is not valid base64 (characters outside the base64 alphabet or "
                     "misplaced padding)", field) from None
    if len(data) > max_bytes:
        raise _error("input_too_large",
                     f"{what} is {len(data)} bytes, over the limit of {max_bytes} bytes", field)
    if not data:
        raise _error("input_empty", f"{what} decodes to an empty payload", field)
    return data


def _decode_data_uri(uri: str, *, max_bytes: int, field: str | None) -> bytes:
    head, comma, payload = uri.partition(",")
    if not comma:
        raise _error("input_invalid_base64", "malformed data: URI (no ',' before the payload)", field)
    params = [p.strip().lower() for p in head[5:].split(";")]
    if "base64" in params[1:]:
        if "%" in payload:
            payload = urllib.parse.unquote(payload)
        return _b64decode(payload, max_bytes=max_bytes, field=field, what="data: URI payload")
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _error("input_too_large",
                     f"data: URI payload is {len(data)} bytes, over the limit of {max_bytes} bytes",
                     field)
    if not data:
        raise _error("input_empty", "data: URI payload is empty", field)
    return data


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # without brackets, lower case
    port: int
    request_path: str  # path + query, what goes on the request line
    host_header: str


def _parse_url(url: str, field: str | None) -> _Target:
    shown = describe_source(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _error("input_download_failed", f"invalid URL {shown}: {exc}", field) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _error("input_forbidden",
                     f"URL scheme {scheme!r} is not allowed (only http and https): {shown}", field)
    if parts.username is not None or parts.password is not None:
        raise _error("input_forbidden", f"credentials in URLs are not supported: {shown}", field)
    host = parts.hostname
    if not host:
        raise _error("input_download_failed", f"invalid URL {shown}: no host", field)
    default_port = 443 if scheme == "https" else 80
    port = port or default_port
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == default_port else f"{bracketed}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(scheme, host, port, path, host_header)


def _resolve_checked(target: _Target, limits: InputLimits, field: str | None,
                     shown: str) -> list[str]:
    """Every address ``target.host`` resolves to, or an error if any one is not allowed."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise _error("input_download_failed",
                     f"download failed: cannot resolve host {target.host!r} ({exc}): {shown}",
                     field) from None
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = str(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise _error("input_download_failed",
                     f"download failed: host {target.host!r} has no IPv4/IPv6 address: {shown}", field)
    for ip in addresses:
        why = _address_refusal(ip, limits)
        if why is not None:
            named = target.host if target.host == ip else f"{target.host} ({ip})"
            raise _error("input_forbidden",
                         f"URL not allowed: {named} is {why}: {shown}", field)
    return addresses


def _pool(target: _Target, ip: str, limits: InputLimits, remaining: float
          ) -> urllib3.HTTPConnectionPool:
    timeout = urllib3.Timeout(connect=min(limits.connect_timeout_s, remaining),
                              read=min(limits.read_timeout_s, remaining))
    common = dict(port=target.port, timeout=timeout, retries=False, maxsize=1, block=False)
    if target.scheme == "https":
        import certifi  # a dependency of requests; the same CA bundle requests would use

        return urllib3.HTTPSConnectionPool(
            ip, server_hostname=target.host, assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **common)
    return urllib3.HTTPConnectionPool(ip, **common)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # urllib3 messages repeat the pool (our validated IP) and can be long; keep them short.
    return _clip(text, 160)


def _request(target: _Target, addresses: list[str], limits: InputLimits, deadline: float,
             field: str | None, shown: str) -> tuple[urllib3.BaseHTTPResponse, urllib3.HTTPConnectionPool]:
    headers = {"Host": target.host_header, "User-Agent": _USER_AGENT, "Accept": "*/*",
               "Accept-Encoding": "identity"}
    last: BaseException | None = None
    for ip in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pool = _pool(target, ip, limits, remaining)
        try:
            resp = pool.urlopen("GET", target.request_path, headers=headers, redirect=False,
                                retries=False, preload_content=False, decode_content=True,
                                assert_same_host=False)
            return resp, pool
        except urllib3.exceptions.ReadTimeoutError:
            pool.close()
            raise _error("input_download_failed",
                         f"download failed: no response within {min(limits.read_timeout_s, remaining):g} s"
                         f": {shown}", field) from None
        except urllib3.exceptions.ConnectTimeoutError as exc:  # includes NewConnectionError
            pool.close()
            last = exc  # try the next address of the host
        except (Urllib3HTTPError, OSError) as exc:
            pool.close()
            raise _error("input_download_failed", f"download failed: {_reason(exc)}: {shown}",
                         field) from None
    if last is None:
        raise _error("input_download_failed",
                     f"download failed: timed out after {limits.total_timeout_s:g} s: {shown}", field)
    if isinstance(last, urllib3.exceptions.NewConnectionError):
        why = f"cannot connect ({_reason(last)})"
    else:
        why = f"connection timed out after {limits.connect_timeout_s:g} s"
    raise _error("input_download_failed", f"download failed: {why}: {shown}", field)


def _read_body(resp: urllib3.BaseHTTPResponse, *, max_bytes: int, limits: InputLimits,
               deadline: float, field: str | None, shown: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise _error("input_too_large",
                     f"download is {int(length)} bytes (Content-Length), over the limit of "
                     f"{max_bytes} bytes: {shown}", field)
    body = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _error("input_download_failed",
                         f"download failed: not finished within {limits.total_timeout_s:g} s "
                         f"({len(body)} bytes received): {shown}", field)
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:  # bound each read by what is left of the total time
            sock.settimeout(min(limits.read_timeout_s, remaining))
        try:
            chunk = resp.read1(_CHUNK)
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError, socket.timeout):
            raise _error("input_download_failed",
                         f"download failed: read timed out ({len(body)} bytes received): {shown}",
                         field) from None
        except (Urllib3HTTPError, OSError) as exc:
            raise _error("input_download_failed", f"download failed: {_reason(exc)}: {shown}",
                         field) from None
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise _error("input_too_large",
                         f"download exceeds the limit of {max_bytes} bytes: {shown}", field)
    if not body:
        raise _error("input_empty", f"download returned an empty body: {shown}", field)
    return bytes(body)


def _download(url: str, *, max_bytes: int, limits: InputLimits, field: str | None) -> bytes:
    started = time.monotonic()
    deadline = started + limits.total_timeout_s
    current = url
    for hop in range(limits.max_redirects + 1):
        shown = describe_source(current)
        if hop:
            shown += f" (redirected from {describe_source(url)})"
        target = _parse_url(current, field)
        addresses = _resolve_checked(target, limits, field, shown)
        resp, pool = _request(target, addresses, limits, deadline, field, shown)
        try:
            status = resp.status
            if status in _REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                if not location:
                    raise _error("input_download_failed",
                                 f"download failed: HTTP {status} redirect without Location: {shown}",
                                 field)
                current = urllib.parse.urljoin(current, location.strip())
                log.debug("redirect %d -> %s", status, describe_source(current))
                continue
            if status >= 400:
                reason = f" {resp.reason}" if resp.reason else ""
                raise _error("input_download_failed", f"download failed: HTTP {status}{reason}: {shown}",
                             field)
            if not 200 <= status < 300:
                raise _error("input_download_failed",
                             f"download failed: unexpected HTTP status {status}: {shown}", field)
            body = _read_body(resp, max_bytes=max_bytes, limits=limits, deadline=deadline,
                              field=field, shown=shown)
            log.info("fetched %s%s: %d bytes in %.2f s after %d redirect(s)",
                     f"{field} " if field else "", shown, len(body), time.monotonic() - started, hop)
            return body
        finally:
            resp.close()  # never drain: the body may be huge or never end
            pool.close()
    raise _error("input_download_failed",
                 f"download failed: more than {limits.max_redirects} redirects: {describe_source(url)}",
                 field)


# --------------------------------------------------------------------------- entry point


def fetch_bytes(source: str, *, kind: Kind, limits: InputLimits, field: str | None = None) -> bytes:
    """Return the bytes of an input given as an http(s) URL, a ``data:`` URI or raw base64.

    ``kind`` selects the size cap; ``field`` (e.g. ``"scenes[0].audio"``) prefixes every
    error message. See the module docstring for the rules and error codes.
    """
    if not isinstance(source, str):
        raise InvalidInput(f"{field or 'input'}: expected a URL or base64 string, got "
                           f"{type(source).__name__}")
    max_bytes = limits.max_bytes(kind)
    s = source.strip()
    if not s:
        raise _error("input_empty", "input is empty (expected a URL, data: URI or base64)", field)
    head = s[:8].lower()
    if head.startswith(("http://", "https://")):
        return _download(s, max_bytes=max_bytes, limits=limits, field=field)
    if head.startswith("data:"):
        return _decode_data_uri(s, max_bytes=max_bytes, field=field)
    scheme = _SCHEME_RE.match(s)
    if scheme:  # ':' never occurs in base64, so this is a URI of another scheme
        raise _error("input_forbidden",
                     f"URL scheme {scheme.group(1).lower()!r} is not allowed (use an http(s) URL, a "
                     f"data: URI or base64): {describe_source(s)}", field)
    return _b64decode(s, max_bytes=max_bytes, field=field, what="base64 input")
