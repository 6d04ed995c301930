"""Tests for storystudio.inputs: URL/data:/base64 inputs, limits and the address guard.

Every request goes to a threaded http.server on 127.0.0.1 started by this module. An
autouse guard wraps ``socket.socket.connect`` so that no test can open a connection to
anything but loopback, whatever the code under test does: the refusals of 10.x and
169.254.169.254 are proven by the guard seeing *no* attempt at all.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import io
import ipaddress
import socket
import ssl
import threading
import time
import wave
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from storystudio.errors import InputFetchError, InvalidInput
from storystudio.inputs import InputLimits, address_forbidden, describe_source, fetch_bytes

LOOPBACK = InputLimits(allow_private=True)
ONLY_127 = InputLimits(allow_networks=("127.0.0.0/8",))  # loopback v4 only; 10.x etc. still refused


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float = 0.1, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * int(seconds * rate))
    return buf.getvalue()


PNG = _png()
WAV = _wav()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901 - a switch over test endpoints
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        stop: threading.Event = srv.stop  # type: ignore[attr-defined]
        try:
            if parts.path == "/image.png":
                self._send(200, PNG, {"Content-Type": "image/png"})
            elif parts.path == "/audio.wav":
                self._send(200, WAV, {"Content-Type": "audio/wav"})
            elif parts.path == "/text":
                self._send(200, b"this is not an image\n" * 10, {"Content-Type": "text/plain"})
            elif parts.path == "/empty":
                self._send(200, b"")
            elif parts.path == "/missing":
                self._send(404, b"nope")
            elif parts.path == "/error":
                self._send(503, b"busy")
            elif parts.path == "/redirect":
                self._send(int(query.get("status", ["302"])[0]), b"", {"Location": query["to"][0]})
            elif parts.path == "/loop":
                self._send(302, b"", {"Location": "/loop"})
            elif parts.path == "/slow":  # headers never come within the read timeout
                stop.wait(5)
            elif parts.path == "/drip":  # each byte is quick, the whole body is not
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    if stop.wait(0.02):
                        break
                    self.wfile.write(b"x")
                    self.wfile.flush()
            elif parts.path == "/big-cl":  # announced too large
                self._send(200, b"x" * 5000)
            elif parts.path == "/big-stream":  # no Content-Length: counted while streaming
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(b"y" * 1000)
                self.close_connection = True
            elif parts.path == "/short":  # body shorter than its Content-Length
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"z" * 10)
                self.close_connection = True
            else:
                self._send(404, b"unknown endpoint")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, which is what several tests want


def _start(host: str, family: int = socket.AF_INET, wrap: ssl.SSLContext | None = None):
    cls = type("S", (_Server,), {"address_family": family})
    srv = cls((host, 0), Handler)
    srv.seen = []  # type: ignore[attr-defined]
    srv.stop = threading.Event()  # type: ignore[attr-defined]
    if wrap is not None:
        srv.socket = wrap.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server():
    srv = _start("127.0.0.1")
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server) -> str:
    server.seen.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(autouse=True)
def connects(monkeypatch) -> list[str]:
    """Every address a socket tried to connect to; anything but loopback is blocked."""
    attempts: list[str] = []
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        attempts.append(host)
        try:
            loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConnectionRefusedError(f"test guard: connecting to {host} is not allowed")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in attempts), attempts


def _fails(code: str, source: str, limits: InputLimits = LOOPBACK, kind: str = "image",
           field: str | None = "scenes[0].image") -> InputFetchError:
    with pytest.raises(InputFetchError) as info:
        fetch_bytes(source, kind=kind, limits=limits, field=field)  # type: ignore[arg-type]
    assert info.value.code == code, info.value.message
    if field:
        assert info.value.message.startswith(field + ": ")
    return info.value


# ----------------------------------------------------------------------------- happy paths


def test_download_image_and_audio(base, server):
    assert fetch_bytes(f"{base}/image.png", kind="image", limits=LOOPBACK) == PNG
    assert fetch_bytes(f"{base}/audio.wav", kind="audio", limits=LOOPBACK) == WAV
    assert [p for p, _ in server.seen] == ["/image.png", "/audio.wav"]


def test_non_image_bytes_download_but_fail_as_an_image(base):
    from storystudio.errors import MediaError
    from storystudio.media import load_image

    data = fetch_bytes(f"{base}/text", kind="image", limits=LOOPBACK, field="scenes[0].image")
    with pytest.raises(MediaError) as info:
        load_image(data)
    assert info.value.code == "invalid_image"
    assert load_image(fetch_bytes(f"{base}/image.png", kind="image", limits=LOOPBACK)).size == (7, 5)


def test_redirect_followed_and_rechecked(base, server):
    got = fetch_bytes(f"{base}/redirect?to=/image.png&status=307", kind="image", limits=ONLY_127)
    assert got == PNG
    assert [p for p, _ in server.seen] == ["/redirect?to=/image.png&status=307", "/image.png"]


def test_data_uri_and_raw_base64():
    b64 = base64.b64encode(WAV).decode()
    assert fetch_bytes(f"data:audio/wav;base64,{b64}", kind="audio", limits=InputLimits()) == WAV
    assert fetch_bytes(b64, kind="audio", limits=InputLimits()) == WAV
    # wrapped lines, missing padding and the URL-safe alphabet are all common in the wild
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    assert fetch_bytes(wrapped, kind="audio", limits=InputLimits()) == WAV
    raw = bytes(range(256)) * 3
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert fetch_bytes(urlsafe, kind="image", limits=InputLimits()) == raw
    assert fetch_bytes("data:text/plain,hello%20world", kind="image", limits=InputLimits()) == b"hello world"


# ----------------------------------------------------------------------------- address guard


def test_loopback_refused_by_default_and_allowed_with_allow_private(base, server, connects):
    err = _fails("input_forbidden", f"{base}/image.png", limits=InputLimits())
    assert "loopback" in err.message
    assert connects == [] and server.seen == []
    assert fetch_bytes(f"{base}/image.png", kind="image", limits=InputLimits(allow_private=True)) == PNG


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/secret",
    "http://10.255.255.254:8080/x",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",          # shared address space (CGNAT)
    "http://0.0.0.0:80/",
    "http://224.0.0.1/",
    "http://[::1]:80/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a00:1]/",    # NAT64 of 10.0.0.1
    "http://2130706433/",          # 127.0.0.1 as a decimal number
    "http://0x7f.1/",
])
def test_non_public_addresses_refused_before_connecting(url, connects):
    err = _fails("input_forbidden", url, limits=InputLimits())
    assert "not allowed" in err.message
    assert connects == []


def test_redirect_to_private_refused_before_connecting(base, server, connects):
    for target in ("http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/",
                   "http://[::1]/x"):
        connects.clear()
        err = _fails("input_forbidden", f"{base}/redirect?to={target}", limits=ONLY_127)
        assert "redirected from" in err.message
        assert connects == ["127.0.0.1"]  # only the first hop was connected to


def test_redirect_to_file_scheme_refused(base):
    err = _fails("input_forbidden", f"{base}/redirect?to=file:///etc/passwd", limits=LOOPBACK)
    assert "'file'" in err.message


def test_too_many_redirects(base):
    err = _fails("input_download_failed", f"{base}/loop", limits=InputLimits(allow_private=True,
                                                                            max_redirects=2))
    assert "more than 2 redirects" in err.message


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://example.com/a.png",
                                    "gopher://example.com/", "FILE:/etc/hosts", "jar:http://x/!/a"])
def test_other_schemes_refused(source, connects):
    err = _fails("input_forbidden", source)
    assert "not allowed" in err.message
    assert connects == []


def test_credentials_in_url_refused(base):
    _fails("input_forbidden", base.replace("http://", "http://user:pw@") + "/image.png")


def test_dns_answer_mixing_public_and_private_is_refused(monkeypatch, connects):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "mixed.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    err = _fails("input_forbidden", "http://mixed.test/a.png", limits=InputLimits())
    assert "10.1.2.3" in err.message
    assert connects == []


def test_dns_rebinding_connects_to_the_validated_address(base, server, monkeypatch, connects):
    """The host resolves to loopback when checked and to 10.x afterwards: the connection must
    still go to the address that was checked (the guard would block 10.x anyway)."""
    port = server.server_address[1]
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"])
    lookups: list[str] = []

    def rebinding(host, *args, **kwargs):
        if host == "media.test":
            lookups.append(host)
            ip = next(answers, "10.9.9.9")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    got = fetch_bytes(f"http://media.test:{port}/image.png", kind="image", limits=ONLY_127)
    assert got == PNG
    assert lookups == ["media.test"]          # resolved once, never again
    assert connects == ["127.0.0.1"]
    assert server.seen == [("/image.png", f"media.test:{port}")]  # Host header kept


def test_address_classifier():
    forbidden = ["127.0.0.1", "10.1.2.3", "172.31.255.255", "192.168.0.1", "169.254.169.254",
                 "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.1",
                 "::", "::1", "fe80::1", "fc00::1", "ff02::1", "::ffff:10.0.0.1", "2002:a00:1::1",
                 "64:ff9b::7f00:1", "2001:db8::1"]
    allowed = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8",
               "64:ff9b::808:808"]
    for ip in forbidden:
        assert address_forbidden(ipaddress.ip_address(ip)), ip
    for ip in allowed:
        assert address_forbidden(ipaddress.ip_address(ip)) is None, ip


@pytest.fixture(scope="module")
def server6():
    try:
        srv = _start("::1", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def test_ipv6_literal_download_when_allowed(server6):
    url = f"http://[::1]:{server6.server_address[1]}/image.png"
    _fails("input_forbidden", url, limits=ONLY_127)
    assert fetch_bytes(url, kind="image", limits=InputLimits(allow_networks=("::1/128",))) == PNG
    assert server6.seen[-1] == ("/image.png", f"[::1]:{server6.server_address[1]}")


# ----------------------------------------------------------------------------- failures


def test_http_errors(base):
    err = _fails("input_download_failed", f"{base}/missing")
    assert "HTTP 404" in err.message and "/missing" in err.message
    assert "HTTP 503" in _fails("input_download_failed", f"{base}/error").message


def test_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _fails("input_download_failed", f"http://127.0.0.1:{port}/x")
    assert "cannot connect" in err.message


def test_read_timeout(base):
    limits = InputLimits(allow_private=True, read_timeout_s=0.2)
    t0 = time.monotonic()
    err = _fails("input_download_failed", f"{base}/slow", limits=limits)
    assert time.monotonic() - t0 < 3
    assert "0.2 s" in err.message


def test_total_timeout_bounds_a_slow_drip(base):
    limits = InputLimits(allow_private=True, read_timeout_s=5, total_timeout_s=0.4)
    t0 = time.monotonic()
    err = _fails("input_download_failed", f"{base}/drip", limits=limits)
    assert time.monotonic() - t0 < 2
    assert "timed out" in err.message or "not finished" in err.message


def test_size_cap_with_and_without_content_length(base, server):
    limits = InputLimits(allow_private=True, max_image_bytes=1000)
    err = _fails("input_too_large", f"{base}/big-cl", limits=limits)
    assert "Content-Length" in err.message
    err = _fails("input_too_large", f"{base}/big-stream", limits=limits)
    assert "1000 bytes" in err.message
    # the cap is per kind
    assert len(fetch_bytes(f"{base}/big-cl", kind="audio", limits=InputLimits(
        allow_private=True, max_image_bytes=1000))) == 5000


def test_truncated_body_and_empty_body(base):
    _fails("input_download_failed", f"{base}/short")
    err = _fails("input_empty", f"{base}/empty")
    assert "empty body" in err.message


@pytest.mark.parametrize("source", ["not base64!", "abcde", "data:image/png;base64,@@@@",
                                    "data:image/png;base64", "QUJD=QUJD"])
def test_invalid_base64(source):
    _fails("input_invalid_base64", source)


def test_base64_size_cap_and_empty():
    big = base64.b64encode(b"x" * 2000).decode()
    _fails("input_too_large", big, limits=InputLimits(max_image_bytes=1000))
    _fails("input_too_large", "data:image/png;base64," + big, limits=InputLimits(max_image_bytes=1000))
    _fails("input_empty", "   ")
    _fails("input_empty", "data:image/png;base64,")


def test_messages_never_carry_the_payload():
    payload = base64.b64encode(b"\xff" * 3000).decode() + "!"  # invalid at the very end
    err = _fails("input_invalid_base64", payload, field="scenes[3].audio")
    assert payload[:40] not in err.message and len(err.message) < 300
    err = _fails("input_too_large", "data:audio/mpeg;base64," + payload[:-1],
                 limits=InputLimits(max_audio_bytes=10), kind="audio", field=None)
    assert payload[:40] not in err.message and len(err.message) < 300
    long_url = "http://169.254.169.254/" + "a" * 500 + "?X-Amz-Signature=secret"
    err = _fails("input_forbidden", long_url, limits=InputLimits())
    assert "secret" not in err.message and "a" * 120 not in err.message


def test_describe_source():
    assert describe_source("https://u:p@host.example/a/b.png?sig=1") == "https://host.example/a/b.png?\u2026"
    assert describe_source("QUJD" * 100) == "base64 payload (400 chars)"
    assert describe_source("data:audio/wav;base64,QUJD").startswith("data:audio/wav;base64,\u2026")


def test_non_string_source():
    with pytest.raises(InvalidInput):
        fetch_bytes(b"abc", kind="image", limits=InputLimits(), field="image")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "media.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("media.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    srv = _start("127.0.0.1", wrap=ctx)
    yield srv, cert_path
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def test_https_verifies_the_host_name_while_connecting_to_the_checked_ip(tls_server, monkeypatch):
    srv, cert_path = tls_server
    port = srv.server_address[1]
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "media.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    url = f"https://media.test:{port}/image.png"
    # not in the CA bundle: verification must fail
    err = _fails("input_download_failed", url, limits=ONLY_127)
    assert "certificate" in err.message.lower() or "ssl" in err.message.lower()
    # trusted: SNI and certificate check use the name, the socket goes to 127.0.0.1
    import certifi

    monkeypatch.setattr(certifi, "where", lambda: str(cert_path))
    assert fetch_bytes(url, kind="image", limits=ONLY_127) == PNG
    assert srv.seen[-1] == ("/image.png", f"media.test:{port}")


# ----------------------------------------------------------------------------- from_env


def test_limits_from_env():
    limits = InputLimits.from_env({
        "STORYSTUDIO_MAX_IMAGE_MB": "1.5", "STORYSTUDIO_MAX_AUDIO_MB": "2",
        "STORYSTUDIO_MAX_VIDEO_MB": "3", "STORYSTUDIO_DOWNLOAD_TIMEOUT_S": "7.5",
        "STORYSTUDIO_ALLOW_PRIVATE_URLS": "true", "STORYSTUDIO_ALLOW_NETWORKS": "10.1.0.0/16, fd00::/8"})
    assert limits.max_image_bytes == int(1.5 * 1024 * 1024)
    assert limits.max_audio_bytes == 2 * 1024 * 1024
    assert limits.max_video_bytes == 3 * 1024 * 1024
    assert limits.total_timeout_s == 7.5
    assert limits.allow_private is True
    assert limits.allow_networks == ("10.1.0.0/16", "fd00::/8")
    defaults = InputLimits.from_env({})
    assert defaults == InputLimits()
    assert defaults.max_image_bytes == 20 * 1024 * 1024 and defaults.max_redirects == 3
    assert InputLimits.from_env({"STORYSTUDIO_ALLOW_PRIVATE_URLS": "1"}).allow_private
    assert not InputLimits.from_env({"STORYSTUDIO_ALLOW_PRIVATE_URLS": "0"}).allow_private
    for bad in ({"STORYSTUDIO_MAX_IMAGE_MB": "lots"}, {"STORYSTUDIO_DOWNLOAD_TIMEOUT_S": "-1"},
                {"STORYSTUDIO_ALLOW_PRIVATE_URLS": "maybe"}, {"STORYSTUDIO_ALLOW_NETWORKS": "10.0.0.0/33"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InputLimits.from_env(bad)
