"""Image bytes from the URLs and data URIs that users send to the prediction API.

The service is public, so fetching a URL must not let a caller reach what only the server can reach
(server-side request forgery) nor tie it up. A URL is fetched only when it is http(s), carries no
credentials, and every address its host resolves to is public, unless the deployment exempts the host
or network (SEEDS_TF_URL_ALLOW). Redirects are followed here, not by requests, so each hop is checked
the same way before anything is sent to it. Downloads are bounded in size, number of redirects and
time: per read (socket timeouts) and overall (`_Watchdog`, which also ends a server that sends a byte
now and then forever, in the body or in the headers). What arrives must look like an image.

DNS rebinding: requests would resolve the host name again when it connects, and a hostile DNS server
could then answer with an internal address. Instead, each hop connects to exactly the address that was
checked (`_PinnedAdapter`); the host name still goes into the Host header and, for https, into SNI and
certificate verification, so TLS is as strict as without pinning.

Residual risks: name resolution itself is not covered by the deadline (the resolver's own timeouts
apply), and a host exempted by name is trusted whatever it resolves to."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import ipaddress
import itertools
import logging
import math
import os
import re
import socket
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import PIL.Image
import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from seeds_tf import __version__
from seeds_tf.core.errors import InputError
from seeds_tf.data.images import Upload

_LOGGER = logging.getLogger(__name__)

ALLOW_ENV = "SEEDS_TF_URL_ALLOW"
MAX_BYTES_ENV = "SEEDS_TF_URL_MAX_BYTES"
TIMEOUT_ENV = "SEEDS_TF_URL_TIMEOUT"

MAX_BYTES = 20 * 1024 * 1024
"""Largest image accepted, from a URL or a data URI."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NOT_PUBLIC = (
    ("is_unspecified", "an unspecified"),
    ("is_loopback", "a loopback"),
    ("is_link_local", "a link-local"),
    ("is_site_local", "a site-local"),
    ("is_multicast", "a multicast"),
    ("is_private", "a private"),
    ("is_reserved", "a reserved"),
)
"""Checked in order, so a message names the most specific kind (loopback is private too)."""


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """Limits of URL fetching; from_env() reads the deployment's settings.

    read_timeout_s bounds each wait for the server; total_timeout_s bounds the whole download,
    redirects included, so a body that trickles in forever still ends.
    """

    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0
    max_bytes: int = MAX_BYTES
    max_redirects: int = 3
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Networks exempt from the address guard (a deployment's own image store, tests on loopback)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names exempt from the address guard, exactly (subdomains are not included)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FetchPolicy:
        """The default policy with the deployment's settings applied.

        SEEDS_TF_URL_ALLOW: comma-separated host names and/or networks or addresses exempt from the
        address guard (e.g. "127.0.0.1,10.0.0.0/8,images.example.org"); SEEDS_TF_URL_MAX_BYTES and
        SEEDS_TF_URL_TIMEOUT (read timeout, seconds) are optional.

        Raises:
            ValueError: naming the variable, for a value that cannot be used.
        """
        networks, hosts = _parse_allow(environ.get(ALLOW_ENV, ""))
        settings: dict[str, Any] = {"allowed": networks, "allowed_hosts": hosts}
        if environ.get(MAX_BYTES_ENV, "").strip():
            settings["max_bytes"] = _positive(environ, MAX_BYTES_ENV, int)
        if environ.get(TIMEOUT_ENV, "").strip():
            settings["read_timeout_s"] = _positive(environ, TIMEOUT_ENV, float)
        return cls(**settings)


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses, and for
    IPv6 forms that embed such an IPv4 address (IPv4-mapped, 6to4, NAT64): the kernel or a gateway
    would deliver those to the IPv4 address inside."""
    return _why_not_public(address) is None


def check_url(url: str, policy: FetchPolicy, field: str = "url") -> None:
    """Refuses a URL that the service must not fetch, before anything is sent.

    Raises:
        InputError: naming `field`, unless the scheme is http(s), there is a host and no credentials,
            and the host is in policy.allowed_hosts or every address it resolves to is public or
            inside policy.allowed.
    """
    _checked_address(url, policy, field, repr(url))


def fetch_image_bytes(url: str, policy: FetchPolicy, field: str = "url") -> bytes:
    """Downloads the image at `url` within the limits of `policy`.

    Raises:
        InputError: naming `field` and the URL, when the URL is refused, the server cannot be reached,
            answers an error, a redirect loop or something that is not an image, or the download is
            too large or too slow.
    """
    watchdog = _Watchdog(policy.total_timeout_s)
    try:
        download = _Download(policy, watchdog, field, repr(url))
        current = url
        for redirects in itertools.count():
            if watchdog.expired:
                raise download.error("timed out")
            address = _checked_address(current, policy, field, download.subject)
            with _pinned_session(address, watchdog) as session, download.get(session, current) as response:
                location = response.headers.get("Location")
                if response.status_code not in _REDIRECT_STATUSES or not location:
                    return download.image_body(response)
            if redirects == policy.max_redirects:
                raise InputError(field, f"{url!r} redirects more than {policy.max_redirects} times")
            current = urljoin(current, location)
            download = dataclasses.replace(download, subject=f"{current!r} (redirected from {url!r})")
    finally:
        watchdog.close()


MAX_IMAGES = 8
"""Most images in one prediction request, uploads, URLs and data URIs together."""


def gather_images(
    uploads: list[Upload | tuple[str, bytes]],
    urls: str,
    data_uris: str,
    policy: FetchPolicy,
    max_images: int = MAX_IMAGES,
) -> list[Upload | tuple[str, bytes]]:
    """Every image of a request, in order: uploads, then URLs (named `urls`), then data URIs (`data`).

    The images are counted before anything is split, fetched or decoded, so a huge field costs no
    more than reading it. The URLs are fetched at once, in threads, each within the policy's
    deadline: the fetching of the whole request ends within `policy.total_timeout_s`.

    Args:
        uploads: the uploaded files, already read.
        urls: http(s) URLs separated by whitespace or commas (_URL_SEPARATED).
        data_uris: base64 data URIs separated by whitespace (split only before `data:`).
        policy: the limits of URL fetching.
        max_images: refuse requests with more images than this, before fetching anything.

    Raises:
        InputError: for no image at all, too many, or any URL or data URI that fails.
    """
    limit = max_images + 1  # counting stops one past the limit: enough to refuse
    count = len(uploads) + _count(_URL_SEPARATED, urls, limit) + _count_data_uris(data_uris, limit)
    if count == 0:
        raise InputError("image", "no image: upload one (image), or give urls or data")
    if count > max_images:
        raise InputError("image", f"more than {max_images} images in one request; the limit is {max_images}")
    url_list = _URL_SEPARATED.findall(urls)
    for url in url_list:
        if len(url) > MAX_URL_LENGTH:
            raise InputError("urls", f"a URL of {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    fetched = []
    if url_list:
        with concurrent.futures.ThreadPoolExecutor(len(url_list)) as pool:
            bodies = pool.map(lambda url: fetch_image_bytes(url, policy, "urls"), url_list)
            fetched = [Upload(url, body, "urls") for url, body in zip(url_list, bodies, strict=True)]
    uri_list = _DATA_URI_SEPARATOR.split(data_uris.strip()) if data_uris.strip() else []
    decoded = [
        Upload(f"data URI {i + 1}", decode_data_uri(uri, "data"), "data") for i, uri in enumerate(uri_list)
    ]
    return [*uploads, *fetched, *decoded]


MAX_URL_LENGTH = 2048
"""Longest URL accepted (browsers and servers refuse longer ones anyway)."""

_URL_SEPARATED = re.compile(r"(?:[^\s,]|,(?![\s,]|\Z|[A-Za-z][A-Za-z0-9+.-]*://))+")
"""A URL of the `urls` field: a comma separates two only before whitespace, another comma, the end
or a scheme (`a.jpg,https://b.jpg`); one inside a URL, as image CDNs put in their paths
(`/upload/w_300,h_200/seed.jpg`), is kept: the URL was cut there, and its first part fetched."""
_DATA_URI_SEPARATOR = re.compile(r"(?<=\S)\s++(?=data:)", re.IGNORECASE)
"""Whitespace between two data URIs: only before `data:`, so that a payload wrapped over lines (the
`base64` command's output) or holding spaces (each `+` of a form body sent unencoded, `curl -d`)
stays one URI; it was split into pieces, refused as 'more than 8 images'. The lookbehind and the
possessive quantifier keep the search linear over any run of whitespace."""


def _count(pattern: re.Pattern, text: str, limit: int) -> int:
    """How many items `pattern` finds in `text`, counting no further than `limit`."""
    return sum(1 for _ in itertools.islice(pattern.finditer(text), limit))


def _count_data_uris(text: str, limit: int) -> int:
    """How many data URIs the `data` field holds (_DATA_URI_SEPARATOR), counting no further than `limit`."""
    if not text or text.isspace():
        return 0
    return 1 + _count(_DATA_URI_SEPARATOR, text, limit - 1)


def decode_data_uri(uri: str, field: str = "image", max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a 'data:image/<type>;base64,<payload>' URI.

    Raises:
        InputError: naming `field`, when `uri` is not a base64 data URI of an image type, the payload
            is not valid base64, or it decodes to more than max_bytes.
    """
    shown = repr(uri if len(uri) <= 60 else uri[:57] + "...")
    header, comma, payload = uri.partition(",")
    if header[:5].lower() != "data:" or not comma:
        raise InputError(field, f"{shown} is not a data URI (data:image/<type>;base64,<data>)")
    media_type, *parameters = header[5:].split(";")
    if not parameters or parameters[-1].strip().lower() != "base64":
        raise InputError(field, f"{shown} is not base64-encoded (';base64' is missing)")
    if not media_type.strip().lower().startswith("image/"):
        raise InputError(field, f"{shown} has media type {media_type!r}, not an image type")
    # Spaces in base64 are the `+` of a form body sent unencoded; other whitespace wraps lines.
    compact = "".join(payload.strip().replace(" ", "+").split())
    # 4 characters encode 3 bytes: refuse oversized payloads before spending memory on decoding them.
    if len(compact) > 4 * math.ceil(max_bytes / 3):
        raise InputError(field, f"{shown} is too large: more than {max_bytes} bytes")
    try:
        data = base64.b64decode(compact, validate=True)
    except ValueError:
        raise InputError(field, f"{shown} does not hold valid base64") from None
    if len(data) > max_bytes:
        raise InputError(field, f"{shown} is too large: more than {max_bytes} bytes")
    return data


class _Session(requests.Session):
    """A Session that never looks at redirects: this module follows them itself, after checking each
    target. (With allow_redirects=False, requests still reads a redirect's whole body, without limit,
    to prepare Response.next.)"""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


class _PinnedAdapter(requests.adapters.HTTPAdapter):
    """Sends every request to one checked address, whatever the URL's host resolves to by now, over
    connections that the download's watchdog can end.

    The URL's host and port still go into the Host header (the connection's own would be the address).
    """

    def __init__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, watchdog: _Watchdog):
        self._address = address  # before super().__init__, which calls init_poolmanager
        self._watchdog = watchdog
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)  # keeps requests' bookkeeping
        self.poolmanager = _PinnedPoolManager(
            self._address, self._watchdog, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )

    def add_headers(self, request: requests.PreparedRequest, **kwargs: Any) -> None:
        request.headers["Host"] = urlsplit(request.url).netloc


class _PinnedPoolManager(urllib3.PoolManager):
    def __init__(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, watchdog: _Watchdog, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._address = address
        self._watchdog = watchdog

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> urllib3.HTTPConnectionPool:
        """A pool connecting to the checked address (urllib3's documented point of customisation); for
        https, `host` remains the name that TLS sends (SNI) and verifies the certificate against."""
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["watchdog"] = self._watchdog
        if scheme == "https":
            context["server_hostname"] = host
        return super()._new_pool(scheme, str(self._address), port, context)


class _WatchedConnection(urllib3.connection.HTTPConnection):
    def __init__(self, *args: Any, watchdog: _Watchdog, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def _new_conn(self) -> socket.socket:
        """The new socket, watched from the start, so the deadline also covers the TLS handshake."""
        sock = super()._new_conn()
        self._watchdog.watch(sock)
        return sock


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Watchdog:
    """Ends a download at its deadline, whatever it is waiting for.

    Socket timeouts cannot: a server that sends a byte now and then, in the headers, the TLS handshake
    or the body, never lets one expire. At the deadline the download's sockets are shut down, which
    ends any read blocked on them; the download then sees `expired` and reports a time-out.
    """

    def __init__(self, seconds: float):
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        # A duplicate, because TLS takes the original over (detaches it); shutdown acts on the
        # connection, so shutting the duplicate down ends reads on the TLS socket too. Duplicates
        # hold their connections open until close(), at the end of the download.
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                _shut_down(duplicate)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        sock.shutdown(socket.SHUT_RDWR)


def _pinned_session(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, watchdog: _Watchdog
) -> requests.Session:
    session = _Session()
    session.trust_env = False  # no proxies, .netrc credentials or CA bundles from the environment
    session.headers.update(
        {"User-Agent": f"seeds_tf/{__version__}", "Accept": "image/*", "Accept-Encoding": "identity"}
    )
    adapter = _PinnedAdapter(address, watchdog)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _checked_address(
    url: str, policy: FetchPolicy, field: str, subject: str
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to connect to for `url`, after checking the URL and every address of its host.

    `subject` names the URL in messages (with where it was redirected from).
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as error:
        raise InputError(field, f"{subject} is not a valid URL ({error})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InputError(field, f"{subject} uses scheme {parts.scheme!r}; only http and https are allowed")
    if not parts.hostname:
        raise InputError(field, f"{subject} has no host")
    if parts.username is not None or parts.password is not None:
        raise InputError(field, f"{subject} contains credentials (user:password@), which are not allowed")
    host = parts.hostname.rstrip(".")
    addresses = _resolve(host, field, subject)
    if host in {name.lower().rstrip(".") for name in policy.allowed_hosts}:
        return addresses[0]
    for address in addresses:
        if any(address in network for network in policy.allowed):
            continue
        reason = _why_not_public(address)
        if reason is not None:
            _LOGGER.warning("Refused to fetch %s: it resolves to %s, %s", url, address, reason)
            raise InputError(field, f"{subject} resolves to {address}, {reason}, which is not allowed")
    return addresses[0]


def _resolve(host: str, field: str, subject: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of `host`, in the resolver's order; an address literal is its own."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise InputError(field, f"{subject}: host {host!r} cannot be resolved ({error})") from None
    addresses = dict.fromkeys(ipaddress.ip_address(sockaddr[0]) for *_, sockaddr in found)
    if not addresses:
        raise InputError(field, f"{subject}: host {host!r} has no address")
    return list(addresses)


def _why_not_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of non-public address `address` is ("a loopback address"), or None when it is public."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = _why_not_public(embedded)
        return None if reason is None else f"an IPv6 form of {embedded}, {reason}"
    for attribute, kind in _NOT_PUBLIC:
        if getattr(address, attribute, False):
            return f"{kind} address"
    return None if address.is_global else "a non-public address"


def _embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclasses.dataclass(frozen=True)
class _Download:
    """One call of fetch_image_bytes, as each hop sees it: the limits, the watchdog of the deadline
    shared by all hops, and how errors name the input (`subject`: the URL, and where it was redirected
    from)."""

    policy: FetchPolicy
    watchdog: _Watchdog
    field: str
    subject: str

    def error(self, problem: str) -> InputError:
        """The error to raise for `problem`; once the deadline has passed, that is the problem (a read
        ended by the watchdog looks like a dropped connection or an early end)."""
        if self.watchdog.expired:
            problem = f"timed out: the download took over {self.policy.total_timeout_s:g} s"
        return InputError(self.field, f"{self.subject} {problem}")

    def get(self, session: requests.Session, url: str) -> requests.Response:
        """The response to GET `url`, its headers read and its body not yet."""
        connect_s, read_s = self.policy.connect_timeout_s, self.policy.read_timeout_s
        _LOGGER.debug("Fetching %s", url)
        try:
            return session.get(url, stream=True, allow_redirects=False, timeout=(connect_s, read_s))
        except requests.ConnectTimeout:
            raise self.error(f"timed out: no connection within {connect_s:g} s") from None
        except requests.Timeout:
            raise self.error(f"timed out: no answer within {read_s:g} s") from None
        except requests.exceptions.SSLError as error:
            _LOGGER.info("TLS with %s failed: %s", url, error)
            raise self.error(
                "could not be reached: the TLS connection failed (invalid certificate?)"
            ) from None
        except requests.ConnectionError as error:
            _LOGGER.info("Connecting to %s failed: %s", url, error)
            raise self.error("could not be reached: the connection failed") from None
        except requests.RequestException as error:
            raise self.error(f"could not be fetched ({error})") from None

    def image_body(self, response: requests.Response) -> bytes:
        """The body of a final (not redirecting) response, refused unless it is a complete image."""
        if not 200 <= response.status_code < 300:
            raise self.error(f"answered HTTP {response.status_code} {response.reason}".rstrip())
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # Decompressing could turn a trickle into a flood; images are compressed already anyway.
            raise self.error(f"was sent with Content-Encoding {encoding!r}, which is not supported")
        content_type = response.headers.get("Content-Type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
            raise self.error(f"is not an image: its Content-Type is {content_type!r}")
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise self.error(f"is too large: {declared} bytes, more than {self.policy.max_bytes}")
        data = self._read_limited(response)
        if not _is_image(data):
            raise self.error("is not an image in a format Pillow can read")
        return data

    def _read_limited(self, response: requests.Response) -> bytes:
        """The body, never more than max_bytes + 1 of it."""
        limit = self.policy.max_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := response.raw.read(min(_CHUNK, limit + 1 - size), decode_content=False):
                size += len(chunk)
                if size > limit:
                    raise self.error(f"is too large: more than {limit} bytes")
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError:
            raise self.error(f"timed out: nothing received for {self.policy.read_timeout_s:g} s") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            _LOGGER.info("Reading %s failed: %s", response.url, error)
            raise self.error("could not be downloaded: the connection failed") from None
        if self.watchdog.expired:  # the end may be the watchdog's doing
            raise self.error("timed out")
        return b"".join(chunks)


def _is_image(data: bytes) -> bool:
    """Whether Pillow identifies `data` as an image, from its header only (nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            # Pixel limits are decode_image's decision, with a better message.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)):
                return True
    except PIL.Image.DecompressionBombError:
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _parse_allow(
    text: str,
) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], tuple[str, ...]]:
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    hosts: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item))
            continue
        except ValueError:
            pass
        name = item.lower().rstrip(".")
        labels = name.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
            raise ValueError(f"{ALLOW_ENV}: {item!r} is neither a host name nor a network or address")
        hosts.append(name)
    return tuple(networks), tuple(hosts)


def _positive(environ: Mapping[str, str], name: str, kind: Callable[[str], float]) -> Any:
    text = environ[name].strip()
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={text!r} must be a positive number")
    return value
