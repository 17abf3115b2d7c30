"""Images from URLs and data URIs: the SSRF guard, the download limits, and data URI decoding.

Everything goes over loopback only. Real HTTP and HTTPS servers run on 127.0.0.1; the `connections`
fixture makes any connection elsewhere fail the test instead of leaving the machine, and `names`
answers host-name lookups from a table, so no DNS query is ever sent. Addresses such as
169.254.169.254 or 8.8.8.8 appear only as literals handed to the guard, which refuses or accepts them
without connecting.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import http.server
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_network

import PIL.Image
import pytest
import requests.adapters
import urllib3.util.connection

from seeds_tf.core.errors import InputError
from seeds_tf.data import sources
from seeds_tf.data.sources import (
    FetchPolicy,
    check_url,
    decode_data_uri,
    fetch_image_bytes,
    is_public_address,
)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 6), (120, 80, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = _encoded("PNG")
JPEG = _encoded("JPEG")
LIMIT = 256 * 1024
LOOPBACK = FetchPolicy(
    connect_timeout_s=1.0,
    read_timeout_s=0.5,
    total_timeout_s=1.5,
    max_bytes=LIMIT,
    allowed=(ip_network("127.0.0.1/32"),),
)
"""Short limits, so the slow cases end quickly, and loopback exempt from the guard."""
DRIPS = dataclasses.replace(LOOPBACK, read_timeout_s=2 * LOOPBACK.total_timeout_s)
"""For the servers that drip a byte every 0.2 s: a busy host can hold a drip back past LOOPBACK's read
timeout (CI saw it with eight drips at once); with this policy only the deadline can end them, as it
must, and a read timeout would still be the watchdog's miss (it comes 1.5 s after the deadline)."""
LATE_S = 1.5
"""How late a timer may end a fetch here: a busy 2-core host delays the threads (a TLS handshake
took 0.8 s more under load); the servers that never end, or stall for 5 s, tell a timer that did
not fire apart all the same."""


_FIXED: dict[str, tuple[int, bytes, str | None, dict[str, str]]] = {
    "/seed.png": (200, PNG, "image/png", {}),
    "/seed.jpg": (200, JPEG, "application/octet-stream", {}),
    "/page.html": (200, b"<html>seeds</html>", "text/html; charset=utf-8", {}),
    "/fake.png": (200, b"just some text, not a picture", "image/png", {}),
    "/gzip.png": (200, PNG, "image/png", {"Content-Encoding": "gzip"}),
    "/huge": (200, PNG, "image/png", {"Content-Length": str(10**12)}),
    "/loop": (302, b"", None, {"Location": "/loop"}),
    "/hop1": (301, b"", None, {"Location": "/hop2"}),
    "/metadata": (302, b"", None, {"Location": "http://169.254.169.254/latest"}),
}
"""Path -> status, body, Content-Type and headers of the test server's simple answers."""


class _Handler(http.server.BaseHTTPRequestHandler):
    """The test server's behaviour: the _FIXED answers, the methods named after the other paths, and
    404 for anything else. The server records each request's path and headers."""

    server: _Server

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the client hung up on an endless or stalled answer, as it should
            super().handle()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers)))
        route, _, argument = self.path.partition("?")
        behaviour = getattr(self, "serve_" + route.strip("/").replace("-", "_"), None)
        if route in _FIXED:
            self._answer(*_FIXED[route])
        elif behaviour is not None:
            behaviour(argument)
        else:
            self._answer(404, b"no such seed", "text/plain", {})

    def serve_sized(self, argument: str) -> None:
        """A PNG padded to exactly `argument` bytes, sent without Content-Length."""
        self._start(200, "image/png", {})
        self.wfile.write(PNG + bytes(int(argument) - len(PNG)))

    def serve_endless(self, argument: str) -> None:
        self._start(200, "image/png", {})
        self._forever(PNG + bytes(64 * 1024 - len(PNG)))

    def serve_stalled(self, argument: str) -> None:
        self._start(200, "image/png", {})
        self.server.stopping.wait(5)

    def serve_drip(self, argument: str) -> None:
        self._start(200, "image/png", {})
        while not self.server.stopping.wait(0.2):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def serve_drip_then_stall(self, argument: str) -> None:
        self._start(200, "image/png", {})
        for _ in range(3):
            self.server.stopping.wait(0.2)
            self.wfile.write(b"\0")
            self.wfile.flush()
        self.server.stopping.wait(5)

    def serve_dripping_headers(self, argument: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.wfile.write(b"X-Seeds: ")
        while not self.server.stopping.wait(0.2):
            self.wfile.write(b"s")
            self.wfile.flush()

    def serve_hop2(self, argument: str) -> None:
        self._answer(307, b"", None, {"Location": f"http://127.0.0.1:{self.server.server_port}/seed.png"})

    def serve_flooding_redirect(self, argument: str) -> None:
        self._start(302, "text/plain", {"Location": "/seed.png"})
        self._forever(b"x" * 64 * 1024)

    def _answer(self, status: int, body: bytes, content_type: str | None, headers: dict[str, str]) -> None:
        self._start(status, content_type, {"Content-Length": str(len(body)), **headers})
        self.wfile.write(body)

    def _start(self, status: int, content_type: str | None, headers: dict[str, str]) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def _forever(self, chunk: bytes) -> None:
        while not self.server.stopping.is_set():
            self.wfile.write(chunk)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.stopping = threading.Event()

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.server_port}{path}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]


@contextlib.contextmanager
def _serving(server: _Server) -> Iterator[_Server]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()  # ends the endless, stalled and dripping handlers
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[_Server]:
    with _serving(_Server()) as running:
        yield running


@pytest.fixture(autouse=True)
def connections(monkeypatch) -> list[str]:
    """The addresses urllib3 connected to; connecting anywhere but loopback fails the test instead."""
    opened: list[str] = []
    real = urllib3.util.connection.create_connection

    def loopback_only(address, *args, **kwargs):
        opened.append(address[0])
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"the code under test tried to connect to {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", loopback_only)
    return opened


@pytest.fixture(autouse=True)
def names(monkeypatch) -> dict[str, list[str]]:
    """Host name -> the addresses it resolves to, for the test to fill; no real DNS query is sent."""
    table: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def from_table(host, port, family=0, type=0, proto=0, flags=0):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the test's table") from None
            return [_address_info(address, port) for address in table[host]]
        return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", from_table)
    return table


def _address_info(address: str, port: int | None) -> tuple:
    if ipaddress.ip_address(address).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0))


def _refusal(url: str, policy: FetchPolicy = LOOPBACK) -> str:
    with pytest.raises(InputError) as caught:
        fetch_image_bytes(url, policy, field="image_url")
    assert caught.value.field == "image_url"
    assert repr(url) in caught.value.problem
    return caught.value.problem


# Fetching ----------------------------------------------------------------------------------------


def test_an_allowed_url_gives_the_exact_bytes(server):
    assert fetch_image_bytes(server.url("/seed.png"), LOOPBACK) == PNG
    assert fetch_image_bytes(server.url("/seed.jpg"), LOOPBACK) == JPEG  # application/octet-stream
    headers = server.seen[0][1]
    assert headers["User-Agent"].startswith("seeds_tf/")
    assert headers["Host"] == f"127.0.0.1:{server.server_port}"


def test_loopback_is_refused_without_an_exemption_and_nothing_is_sent(server, connections):
    problem = _refusal(server.url("/seed.png"), FetchPolicy())
    assert "resolves to 127.0.0.1, a loopback address, which is not allowed" in problem
    assert server.seen == []
    assert connections == []


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/page.html", "is not an image: its Content-Type is 'text/html; charset=utf-8'"),
        ("/fake.png", "is not an image in a format Pillow can read"),
        ("/missing.png", "answered HTTP 404 Not Found"),
        ("/gzip.png", "Content-Encoding 'gzip'"),
        ("/huge", f"is too large: {10**12} bytes"),
    ],
)
def test_answers_that_are_not_an_image_are_refused(server, path, expected):
    assert expected in _refusal(server.url(path))


def test_the_size_limit_counts_the_bytes_received(server):
    assert len(fetch_image_bytes(server.url(f"/sized?{LIMIT}"), LOOPBACK)) == LIMIT
    assert f"is too large: more than {LIMIT} bytes" in _refusal(server.url(f"/sized?{LIMIT + 1}"))


def test_an_endless_body_stops_at_the_size_limit(server):
    started = time.monotonic()
    assert "is too large" in _refusal(server.url("/endless"))
    assert time.monotonic() - started < 1.0


def test_a_stalled_answer_times_out_after_the_read_timeout(server):
    started = time.monotonic()
    assert "timed out: nothing received for 0.5 s" in _refusal(server.url("/stalled"))
    elapsed = time.monotonic() - started
    assert LOOPBACK.read_timeout_s <= elapsed < LOOPBACK.read_timeout_s + LATE_S


def test_a_slow_drip_ends_at_the_overall_deadline(server):
    started = time.monotonic()
    assert "timed out: the download took over 1.5 s" in _refusal(server.url("/drip"), DRIPS)
    elapsed = time.monotonic() - started
    assert LOOPBACK.total_timeout_s <= elapsed < LOOPBACK.total_timeout_s + LATE_S


def test_headers_that_never_end_end_at_the_overall_deadline(server):
    started = time.monotonic()
    assert "timed out: the download took over 1.5 s" in _refusal(server.url("/dripping-headers"), DRIPS)
    elapsed = time.monotonic() - started
    assert LOOPBACK.total_timeout_s <= elapsed < LOOPBACK.total_timeout_s + LATE_S


def test_the_deadline_also_cuts_a_wait_for_the_server(server):
    """Bytes for 0.6 s, then silence: the read timeout alone would end it at 0.6 + 3 s."""
    policy = FetchPolicy(read_timeout_s=3.0, total_timeout_s=1.0, allowed=LOOPBACK.allowed)
    started = time.monotonic()
    assert "timed out: the download took over 1 s" in _refusal(server.url("/drip-then-stall"), policy)
    assert 1.0 <= time.monotonic() - started < 1.0 + LATE_S


def test_a_closed_port_is_a_connection_failure():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"http://127.0.0.1:{port}/seed.png"
    assert "could not be reached: the connection failed" in _refusal(url)


# Redirects ---------------------------------------------------------------------------------------


def test_a_chain_of_two_redirects_is_followed(server):
    assert fetch_image_bytes(server.url("/hop1"), LOOPBACK) == PNG
    assert server.paths == ["/hop1", "/hop2", "/seed.png"]
    policy = FetchPolicy(allowed=LOOPBACK.allowed, max_redirects=1)
    assert "redirects more than 1 times" in _refusal(server.url("/hop1"), policy)


def test_a_redirect_loop_ends_at_the_limit(server):
    assert "redirects more than 3 times" in _refusal(server.url("/loop"))
    assert server.paths == ["/loop"] * 4


def test_a_redirect_to_a_refused_address_is_not_followed(server, connections):
    problem = _refusal(server.url("/metadata"))
    assert (
        "'http://169.254.169.254/latest' (redirected from "
        f"'{server.url('/metadata')}') resolves to 169.254.169.254, a link-local address"
    ) in problem
    assert connections == ["127.0.0.1"]  # the first hop only: nothing was sent to 169.254.169.254


def test_the_body_of_a_redirect_is_not_read(server):
    started = time.monotonic()
    assert fetch_image_bytes(server.url("/flooding-redirect"), LOOPBACK) == PNG
    assert time.monotonic() - started < 1.0


# Host names and DNS rebinding --------------------------------------------------------------------


def test_the_address_checked_is_the_address_connected_to(server, monkeypatch, connections):
    """A DNS server that answers an allowed address first and an internal one afterwards (rebinding)
    does not get the download sent to the internal one: it is resolved once, and pinned."""
    answers = iter([["127.0.0.1"], ["10.9.9.9"], ["10.9.9.9"]])
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return [_address_info(address, port) for address in next(answers)]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = server.url("/seed.png", host="rebind.test")
    assert fetch_image_bytes(url, LOOPBACK) == PNG
    assert lookups == ["rebind.test"]
    assert connections == ["127.0.0.1"]
    assert server.seen[0][1]["Host"] == f"rebind.test:{server.server_port}"


def test_allowed_host_names_are_exempt(server, names):
    names["images.test"] = ["127.0.0.1"]
    url = server.url("/seed.png", host="images.test")
    assert "resolves to 127.0.0.1, a loopback address" in _refusal(url, FetchPolicy())
    assert fetch_image_bytes(url, FetchPolicy(allowed_hosts=("Images.Test",))) == PNG


def _certificate(tmp_path, name: str) -> tuple[str, str]:
    """A self-signed certificate for `name` (and only for it), with its key: paths of PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file)


@pytest.fixture
def https_server(tmp_path, monkeypatch, names) -> Iterator[Callable[[str], _Server]]:
    """Starts HTTPS test servers with a certificate for a given name, trusted as if a public CA had
    signed it; the name images.test resolves to them."""
    names["images.test"] = ["127.0.0.1"]
    with contextlib.ExitStack() as stack:

        def start(certified: str) -> _Server:
            cert_file, key_file = _certificate(tmp_path, certified)
            monkeypatch.setattr(requests.adapters, "DEFAULT_CA_BUNDLE_PATH", cert_file)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
            tls_server = _Server()
            tls_server.socket = context.wrap_socket(tls_server.socket, server_side=True)
            return stack.enter_context(_serving(tls_server))

        yield start


def test_https_verifies_the_host_name_while_connecting_to_the_pinned_address(https_server, connections):
    running = https_server("images.test")
    url = running.url("/seed.png", scheme="https", host="images.test")
    assert fetch_image_bytes(url, LOOPBACK) == PNG
    assert running.seen[0][1]["Host"] == f"images.test:{running.server_port}"
    assert connections == ["127.0.0.1"]


def test_https_refuses_a_certificate_for_another_name(https_server):
    running = https_server("other.test")
    assert "the TLS connection failed" in _refusal(
        running.url("/seed.png", scheme="https", host="images.test")
    )
    assert running.seen == []


def test_the_overall_deadline_also_ends_https_downloads(https_server):
    running = https_server("images.test")
    started = time.monotonic()
    assert "timed out: the download took over 1.5 s" in _refusal(
        running.url("/drip", scheme="https", host="images.test"), DRIPS
    )
    assert time.monotonic() - started < LOOPBACK.total_timeout_s + LATE_S


# The address guard -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("240.0.0.1", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::", False),
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::", True),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/passwd", "uses scheme 'file'; only http and https are allowed"),
        ("ftp://8.8.8.8/seed.png", "uses scheme 'ftp'"),
        ("http:///seed.png", "has no host"),
        ("https://user:secret@8.8.8.8/seed.png", "contains credentials"),
        ("https://user@8.8.8.8/seed.png", "contains credentials"),
        ("http://8.8.8.8:99999/seed.png", "is not a valid URL"),
        ("http://[::1/seed.png", "is not a valid URL"),
        ("http://127.0.0.1:8080/a.jpg", "resolves to 127.0.0.1, a loopback address, which is not allowed"),
        ("http://[::ffff:169.254.169.254]/", "an IPv6 form of 169.254.169.254, a link-local address"),
        ("http://0.0.0.0/", "an unspecified address"),
        ("http://nowhere.test/seed.png", "host 'nowhere.test' cannot be resolved"),
    ],
)
def test_check_url_refuses(url, expected):
    with pytest.raises(InputError, match=r"^url: ") as caught:
        check_url(url, FetchPolicy())
    assert caught.value.problem.startswith(repr(url))
    assert expected in caught.value.problem


def test_check_url_accepts_public_addresses_without_sending_anything(names, connections):
    check_url("https://8.8.8.8/seed.png", FetchPolicy())
    check_url("http://[2606:4700:4700::1111]:8080/seed.png", FetchPolicy())
    names["cdn.test"] = ["1.1.1.1", "2606:4700:4700::1111"]
    check_url("https://CDN.test./seed.png", FetchPolicy())
    assert connections == []


def test_every_address_of_a_host_must_be_public(names):
    names["mixed.test"] = ["1.1.1.1", "192.168.1.1"]
    with pytest.raises(InputError, match=r"resolves to 192\.168\.1\.1, a private address"):
        check_url("https://mixed.test/seed.png", FetchPolicy())


def test_allowed_networks_and_hosts_are_exempt(names):
    names["intranet.test"] = ["10.1.2.3"]
    check_url("http://10.1.2.3/seed.png", FetchPolicy(allowed=(ip_network("10.0.0.0/8"),)))
    check_url("http://intranet.test/seed.png", FetchPolicy(allowed=(ip_network("10.0.0.0/8"),)))
    check_url("http://intranet.test/seed.png", FetchPolicy(allowed_hosts=("intranet.test",)))
    with pytest.raises(InputError, match=r"10\.1\.2\.3, a private address"):
        check_url("http://intranet.test/seed.png", FetchPolicy(allowed=(ip_network("10.0.0.0/16"),)))


# Settings ----------------------------------------------------------------------------------------


def test_policy_from_an_empty_environment_is_the_default():
    assert FetchPolicy.from_env({}) == FetchPolicy()


def test_policy_from_env_reads_hosts_networks_and_limits():
    policy = FetchPolicy.from_env(
        {
            sources.ALLOW_ENV: " 127.0.0.1, 10.0.0.0/8,,Images.Example.org., fd00::/8 ",
            sources.MAX_BYTES_ENV: "1000",
            sources.TIMEOUT_ENV: "2.5",
        }
    )
    assert policy.allowed == (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"), ip_network("fd00::/8"))
    assert policy.allowed_hosts == ("images.example.org",)
    assert policy.max_bytes == 1000
    assert policy.read_timeout_s == 2.5


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (sources.ALLOW_ENV, "10.0.0.1/8"),
        (sources.ALLOW_ENV, "10.0.0.0/33"),
        (sources.ALLOW_ENV, "300.1.1.1"),
        (sources.ALLOW_ENV, "http://images.example.org"),
        (sources.ALLOW_ENV, "images example org"),
        (sources.MAX_BYTES_ENV, "lots"),
        (sources.MAX_BYTES_ENV, "1.5"),
        (sources.MAX_BYTES_ENV, "0"),
        (sources.TIMEOUT_ENV, "-1"),
        (sources.TIMEOUT_ENV, "nan"),
        (sources.TIMEOUT_ENV, "inf"),
    ],
)
def test_policy_from_env_refuses_bad_values(variable, value):
    with pytest.raises(ValueError, match=variable):
        FetchPolicy.from_env({variable: value})


# Data URIs ---------------------------------------------------------------------------------------


def _data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_a_data_uri_gives_back_its_bytes():
    assert decode_data_uri(_data_uri(PNG)) == PNG
    assert decode_data_uri(_data_uri(JPEG, "IMAGE/JPEG")) == JPEG
    wrapped = "\n".join(base64.encodebytes(PNG).decode().split())
    assert decode_data_uri(f"data:image/png;name=seed.png;base64,{wrapped}") == PNG


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://8.8.8.8/seed.png", "is not a data URI"),
        ("data:image/png;base64", "is not a data URI"),
        ("data:image/png," + "iVBORw0KGgo=", "is not base64-encoded"),
        ("data:text/plain;base64,aGVsbG8=", "has media type 'text/plain', not an image type"),
        ("data:;base64,aGVsbG8=", "has media type '', not an image type"),
        ("data:image/png;base64,iVBOR@0KGgo=", "does not hold valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "does not hold valid base64"),
        ("data:image/png;base64,ñVBORw0KGgo=", "does not hold valid base64"),
    ],
)
def test_data_uri_refusals(uri, expected):
    with pytest.raises(InputError, match=r"^image: ") as caught:
        decode_data_uri(uri)
    assert expected in caught.value.problem


def test_a_data_uri_wrapped_over_lines_or_with_spaces_for_its_plus_signs_is_one_image():
    """`curl -d data=...` sends each `+` as a space, the `base64` command wraps its output: both were
    split into pieces and refused as 'more than 8 images in one request'."""
    data = bytes(range(256)) * 40  # its base64 has `+` and `/`, and wraps over 183 lines
    plain = _data_uri(data)
    sent_as_form = plain.replace("+", " ")
    wrapped = "data:image/png;base64," + base64.encodebytes(data).decode()
    images = sources.gather_images([], "", f"{sent_as_form}\n{wrapped}  {plain} ", LOOPBACK)
    assert [(image.name, image.data) for image in images] == [(f"data URI {i}", data) for i in (1, 2, 3)]


def test_data_uri_size_limit():
    assert decode_data_uri(_data_uri(bytes(11)), max_bytes=11) == bytes(11)
    with pytest.raises(InputError, match="is too large: more than 11 bytes"):
        decode_data_uri(_data_uri(bytes(12)), max_bytes=11)  # caught after decoding: 16 characters
    huge = "data:image/png;base64," + "A" * 10_000_000
    with pytest.raises(InputError, match="is too large: more than 100 bytes") as caught:
        decode_data_uri(huge, max_bytes=100)  # caught before decoding
    assert len(str(caught.value)) < 200  # the message shows the start of the URI, not all of it


def test_the_urls_of_a_request_are_fetched_together_within_one_deadline(server):
    """Eight URLs that each drip until the deadline: fetched at once, they all start before the first
    one's deadline, and the request ends at about one deadline, not eight."""
    urls = " ".join(server.url(f"/drip?{index}") for index in range(sources.MAX_IMAGES))
    started = time.monotonic()
    with pytest.raises(InputError, match=r"timed out: the download took over 1\.5 s") as caught:
        sources.gather_images([], urls, "", DRIPS)
    elapsed = time.monotonic() - started
    assert caught.value.field == "urls"
    assert sorted(server.paths) == sorted(f"/drip?{index}" for index in range(sources.MAX_IMAGES))
    assert elapsed < 2 * LOOPBACK.total_timeout_s


@pytest.mark.parametrize("field", ["urls", "data"])
def test_images_are_counted_before_a_huge_field_is_split(field):
    """A 10 MiB field of a million short items is refused for its count without building the list
    of items (which would cost hundreds of MiB): the call allocates almost nothing."""
    import tracemalloc

    huge = "x " * (5 * 1024 * 1024) if field == "urls" else "data:x " * (1536 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="more than 8 images in one request"):
            sources.gather_images(
                [], huge if field == "urls" else "", huge if field == "data" else "", LOOPBACK
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_a_comma_inside_a_url_is_kept_and_one_between_urls_separates(server):
    """Image CDNs put commas in their URLs (`/upload/w_300,h_200/seed.jpg`): the URL was cut there."""
    first, second = server.url("/seed.png?w_300,h_200"), server.url("/seed.jpg")
    images = sources.gather_images([], f"{first},{second}, ", "", LOOPBACK)
    assert [image.name for image in images] == [first, second]
    assert sorted(path for path, _ in server.seen) == ["/seed.jpg", "/seed.png?w_300,h_200"]


def test_an_overlong_url_is_refused_before_fetching(server):
    url = server.url("/seed.png?" + "a" * sources.MAX_URL_LENGTH)
    with pytest.raises(InputError, match="the limit is 2048") as caught:
        sources.gather_images([], url, "", LOOPBACK)
    assert caught.value.field == "urls"
    assert server.paths == []
