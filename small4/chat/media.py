"""Safe image loading for chat requests: ``data:`` URLs always, remote ``http(s)`` URLs only for allowed hosts.

``load_image(url, policy)`` returns a fully decoded PIL image and the SHA-256 of its encoded bytes (the server
keys the prefix cache on it), or raises ``MediaError`` (a ``ValueError``; the server answers 400). Nothing is
ever written to disk: bytes live in memory, and only formats PIL decodes in memory are opened
(``ALLOWED_FORMATS``; e.g. EPS, which shells out to Ghostscript through temporary files, never is).

``load_image`` is synchronous and may block for up to about ``2 * fetch_timeout_s`` on a remote URL (DNS,
connect, a slow body), and decoding a large image takes CPU time: call it off the event loop (the server renders
chat requests in a worker thread).

Limits (``MediaPolicy``):

* ``max_images`` per request (counted by the chat renderer, which is the one that sees a whole request);
* ``max_image_bytes`` per image: for ``data:`` URLs checked on the base64 length *before* decoding; for remote
  URLs checked against ``Content-Length`` and then while streaming the body, so an endless or lying server is
  cut off as soon as it sends one byte too many;
* ``max_pixels`` per image, and width and height must be positive: checked on the size in the image header,
  *before* any pixel is decoded (decompression bombs). PIL's own global ``Image.MAX_IMAGE_PIXELS`` check is left
  untouched and stays an outer bound (it refuses above twice its default of ~89M pixels);
* ``max_total_pixels`` per request (the caller passes what is left of it as ``pixel_budget``), also from headers;
* memory: at most ``max_concurrent_decodes`` images decode at once in the process, and an image larger than the
  model takes (``max_side``) is shrunk right after decoding, in 8-bit PIL form: JPEGs decode at a reduced DCT
  scale (``Image.draft``), and nothing downstream (mistral-common converts to RGBA and float32 at the size it is
  given) ever sees the full-size image. A 6000x6000 1-bit PNG so costs tens of MB, not GBs;
* truncated or corrupt files fail inside ``load_image`` (``Image.load()`` is called here, not later).

Remote URLs (off unless ``allowed_domains`` is non-empty):

* allowlist: an entry is an exact host (``images.example.com``, an IPv4 address, an IPv6 address with or without
  brackets), or a wildcard ``*.example.com``, which matches any subdomain at any depth (``a.example.com``,
  ``a.b.example.com``) but *not* ``example.com`` itself (list both to allow both). Hosts compare
  case-insensitively, without a trailing dot, in their IDNA (punycode) form; ports are not part of the match;
* URLs with credentials (``user:pass@``) are refused;
* the host is resolved once, and if *any* resolved address is not globally routable (private, loopback,
  link-local, multicast, reserved, unspecified, shared/CGNAT, or an IPv4-mapped / 6to4 / Teredo / NAT64 address
  embedding one) the URL is refused. A literal IP host is checked without any DNS lookup or connection;
* DNS rebinding: the connection goes to the address that was checked, not to the name. The request URL's host
  is replaced by that IP, the ``Host`` header keeps the original host, and for https the original host name is
  passed as ``sni_hostname`` so SNI and certificate verification are against the name the client asked for.
  Proxies from the environment are ignored (``trust_env=False``), since a proxy would resolve the name again;
* redirects are not followed by httpx; they are followed here, at most ``max_redirects`` times, only to hosts
  that are themselves allowed, each hop re-resolved and re-checked; a redirect from https to http is refused;
* the body is read raw (``Accept-Encoding: identity``; a response with a ``Content-Encoding`` is refused, so a
  small gzip body cannot inflate past the byte cap);
* timeout: one deadline for the whole fetch (DNS, connects, redirects, body). Every blocking operation gets the
  time left as its timeout and the deadline is re-checked after each body chunk, so a server dripping bytes is
  cut off too; a single read can overrun the deadline by at most the time that was left when its request
  started, hence the ``2 * fetch_timeout_s`` worst case. DNS runs in a daemon thread that is abandoned (not
  waited for) once the deadline passes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import math
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

import httpx
from PIL import Image

MiB = 1024 * 1024

# Formats PIL decodes in memory, without helpers or temporary files; what OpenAI accepts, plus BMP.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "small4-media/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class MediaError(ValueError):
    """An image that cannot be loaded; the server answers 400 with ``message`` (and ``param``, if known)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse_allowed_domains(value: str | Iterable[str] | None) -> frozenset[str]:
    """``--allowed-media-domains`` -> normalised allowlist entries.

    Takes a comma- or space-separated string or an iterable of entries (each of which may itself hold several);
    empty entries are skipped; an invalid entry raises ``ValueError``.
    """
    if value is None:
        return frozenset()
    items = [value] if isinstance(value, str) else list(value)
    entries = [e for item in items for e in re.split(r"[,\s]+", item) if e]
    return frozenset(_normalize_entry(e) for e in entries)


@dataclass(frozen=True)
class MediaPolicy:
    """What images a server accepts. The default accepts ``data:`` URLs only."""

    allowed_domains: frozenset[str] = frozenset()
    max_images: int = 8
    max_image_bytes: int = 10 * MiB
    max_pixels: int = 40_000_000
    max_total_pixels: int = 64_000_000  # all images of one request
    max_concurrent_decodes: int = 2  # in the whole process (per value: policies with the same value share it)
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    # Only for tests of the fetch path against a loopback server; never a server default.
    allow_private_addresses: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.allowed_domains, str):
            raise TypeError("allowed_domains must be a collection of hosts, not a string; see parse_allowed_domains")
        object.__setattr__(self, "allowed_domains", parse_allowed_domains(self.allowed_domains))
        for name in ("max_images", "max_image_bytes", "max_pixels", "max_total_pixels", "max_concurrent_decodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MediaPolicy.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"MediaPolicy.max_redirects must be >= 0, got {self.max_redirects!r}")
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"MediaPolicy.fetch_timeout_s must be positive, got {self.fetch_timeout_s!r}")

    @property
    def remote_enabled(self) -> bool:
        return bool(self.allowed_domains)

    def allows_host(self, host: str) -> bool:
        """Whether ``host`` (a name or an IP literal, any case, IDNA or unicode) is on the allowlist."""
        try:
            host = _normalize_host(host)
        except ValueError:
            return False
        if host in self.allowed_domains:
            return True
        return any(d.startswith("*.") and host.endswith(d[1:]) for d in self.allowed_domains)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded (possibly shrunk) image, the SHA-256 of the encoded bytes it was decoded from, and the size in
    the header (what counts against the pixel limits)."""

    image: Image.Image = field(repr=False)
    sha256: bytes
    num_bytes: int
    source_pixels: int = 0


def load_image(
    url: str, policy: MediaPolicy, max_side: int | None = None, pixel_budget: int | None = None
) -> LoadedImage:
    """Load, check and fully decode the image behind an OpenAI ``image_url`` url; raise ``MediaError``.

    ``max_side``: the longest side the consumer uses (larger images come back shrunk to it, aspect kept);
    ``pixel_budget``: what the request may still decode (``max_pixels`` also applies). Synchronous and possibly
    slow (network, decoding): call it off the event loop.
    """
    if not isinstance(url, str):
        raise MediaError("image_url needs a url string")
    if url[:5].lower() == "data:":
        return decode_image(_data_url_bytes(url, policy), policy, max_side, pixel_budget)
    if url[:8].lower() == "https://" or url[:7].lower() == "http://":
        if not policy.remote_enabled:
            raise MediaError("remote image URLs are disabled; send the image as a base64 data: URL")
        return decode_image(_fetch(url, policy), policy, max_side, pixel_budget)
    if policy.remote_enabled:
        raise MediaError("image URLs must be base64 data: URLs (data:image/png;base64,...) or http(s) URLs")
    raise MediaError("image URLs must be base64 data: URLs (data:image/png;base64,...)")


def decode_image(
    raw: bytes, policy: MediaPolicy, max_side: int | None = None, pixel_budget: int | None = None
) -> LoadedImage:
    """Encoded image bytes -> ``LoadedImage``; sizes checked from the header before any pixel is decoded, at most
    ``max_concurrent_decodes`` decodes at once, shrunk to ``max_side`` (see ``load_image``)."""
    if not raw:
        raise MediaError("the image is empty")
    if len(raw) > policy.max_image_bytes:
        raise MediaError(f"the image is larger than the limit of {policy.max_image_bytes} bytes")
    formats = ", ".join(ALLOWED_FORMATS)
    try:
        image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise MediaError(f"the image has more than the limit of {policy.max_pixels} pixels") from None
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, struct.error...)
        raise MediaError(f"the image data is not a decodable image ({formats})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaError(f"the image has zero size ({width}x{height})")
    if width * height > policy.max_pixels:
        raise MediaError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {policy.max_pixels} pixels"
        )
    if pixel_budget is not None and width * height > pixel_budget:
        raise MediaError(
            f"the images of this request have more than the limit of {policy.max_total_pixels} pixels in all"
        )
    with _decode_slots(policy.max_concurrent_decodes):
        target = _shrunk_size(width, height, max_side)
        if target is not None and image.format == "JPEG":
            image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale, still at least the target size
        try:
            image.load()
        except Image.DecompressionBombError:
            raise MediaError(f"the image has more than the limit of {policy.max_pixels} pixels") from None
        except Exception:
            raise MediaError("the image data is not a decodable image: the file is truncated or corrupt") from None
        if target is not None:
            image = _shrink(image, target)
    digest = hashlib.sha256(raw).digest()
    return LoadedImage(image=image, sha256=digest, num_bytes=len(raw), source_pixels=width * height)


@cache
def _decode_slots(n: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(n)


def _shrunk_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """The size mistral-common scales an image to before its patch grid (longest side ``max_side``, rounded the
    same way), so the grid and the token count are the ones the full-size image gets; None if it already fits."""
    ratio = max(width, height) / max_side if max_side else 1.0
    if ratio <= 1:
        return None
    return max(round(width / ratio), 1), max(round(height / ratio), 1)


def _shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased downscale in 8-bit form. Palette and 1-bit images become L / RGB / RGBA first (what PIL's
    filters need), keeping transparency so mistral-common still puts it on white."""
    if image.mode not in ("L", "RGB", "RGBA"):
        alpha = image.mode in ("LA", "PA", "RGBa", "La") or "transparency" in image.info
        image = image.convert("RGBA" if alpha else ("L" if image.mode in ("1", "I", "I;16", "F") else "RGB"))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# -- data: URLs -------------------------------------------------------------------------------------


def _data_url_bytes(url: str, policy: MediaPolicy) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise MediaError("image URLs must be base64 data: URLs (data:image/png;base64,...)")
    payload = url[match.end() :]
    if len(payload) > 4 * math.ceil(policy.max_image_bytes / 3):  # checked before decoding anything
        raise MediaError(f"the image is larger than the limit of {policy.max_image_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the image data URL is not valid base64") from None


# -- remote URLs ------------------------------------------------------------------------------------


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    deadline = time.monotonic() + policy.fetch_timeout_s
    target = _parse_url(url)
    with httpx.Client(trust_env=False, follow_redirects=False, headers={"User-Agent": _USER_AGENT}) as client:
        for hop in range(policy.max_redirects + 1):
            host = _check_host(target, policy)
            addresses = _resolve(host, target.port or (443 if target.scheme == "https" else 80), policy, deadline)
            response = _connect(client, target, host, addresses, deadline)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError(f"the image URL answered HTTP {response.status_code} without a Location")
                    if hop == policy.max_redirects:
                        raise MediaError(f"the image URL redirected more than {policy.max_redirects} times")
                    try:
                        following = target.join(location)
                    except (httpx.InvalidURL, ValueError):
                        raise MediaError("the image URL redirected to an invalid URL") from None
                    if target.scheme == "https" and following.scheme != "https":
                        raise MediaError("the image URL redirected from https to http")
                    target = _parse_url(str(following))
                    continue
                if response.status_code != 200:
                    raise MediaError(f"the image URL answered HTTP {response.status_code}")
                return _read_body(response, policy, deadline)
            except httpx.TimeoutException:
                raise MediaError(f"fetching the image timed out after {policy.fetch_timeout_s:g} s") from None
            except httpx.HTTPError as e:
                raise MediaError(f"fetching the image failed: {type(e).__name__}") from None
            finally:
                response.close()
    raise AssertionError("unreachable")  # the loop returns or raises


def _parse_url(url: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise MediaError("the image URL is not a valid URL") from None
    if target.scheme not in ("http", "https") or not target.raw_host:
        raise MediaError("remote image URLs must be http(s) URLs with a host")
    if target.userinfo:
        raise MediaError("image URLs with credentials are refused")
    return target


def _check_host(target: httpx.URL, policy: MediaPolicy) -> str:
    host = target.raw_host.decode("ascii")
    if not policy.allows_host(host):
        raise MediaError(f"the image host {_normalize_host_or_raw(host)!r} is not among the allowed media domains")
    return _normalize_host(host)


def _resolve(host: str, port: int, policy: MediaPolicy, deadline: float) -> list[IPAddress]:
    """The addresses to connect to, all of them checked; a literal IP is checked without any lookup."""
    literal = _ip_or_none(host)
    if literal is not None:
        addresses = [literal]
    else:
        addresses = _getaddrinfo(host, port, deadline)
    if not policy.allow_private_addresses:
        for address in addresses:
            if not is_public_address(address):
                raise MediaError(f"the image host {host!r} resolves to a non-public address ({address})")
    return addresses


def _getaddrinfo(host: str, port: int, deadline: float) -> list[IPAddress]:
    result: list[object] = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except (OSError, UnicodeError) as e:
            result.append(e)

    thread = threading.Thread(target=lookup, name="small4-media-dns", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not result:
        raise MediaError(f"resolving the image host {host!r} timed out")
    if isinstance(result[0], BaseException):
        raise MediaError(f"the image host {host!r} could not be resolved")
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in result[0]:  # type: ignore[union-attr]
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise MediaError(f"the image host {host!r} could not be resolved")
    return addresses


def _connect(
    client: httpx.Client, target: httpx.URL, host: str, addresses: list[IPAddress], deadline: float
) -> httpx.Response:
    """Send the GET to the first checked address that accepts a connection (never to the name)."""
    headers = {"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity", "Accept": "image/*"}
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    for i, address in enumerate(addresses):
        timeout = _remaining(deadline)
        request = client.build_request(
            "GET",
            target.copy_with(host=str(address)),
            headers=headers,
            extensions=extensions,
            timeout=httpx.Timeout(timeout),
        )
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError:
            if i == len(addresses) - 1:
                raise MediaError(f"could not connect to the image host {host!r}") from None
        except httpx.TimeoutException:
            raise MediaError(f"fetching the image timed out after {timeout:g} s") from None
        except httpx.HTTPError as e:
            raise MediaError(f"fetching the image failed: {type(e).__name__}") from None
    raise AssertionError("unreachable")  # addresses is never empty


def _read_body(response: httpx.Response, policy: MediaPolicy, deadline: float) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaError(f"the image URL answered with Content-Encoding {encoding!r}; only identity is accepted")
    limit = policy.max_image_bytes
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise MediaError(f"the image is larger than the limit of {limit} bytes (Content-Length {declared.strip()})")
    body = bytearray()
    # No chunk_size: httpx would buffer up to it; each network read (at most 64 KiB in httpcore) is checked.
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > limit:
            raise MediaError(f"the image is larger than the limit of {limit} bytes")
        if time.monotonic() > deadline:
            raise MediaError(f"fetching the image timed out after {policy.fetch_timeout_s:g} s")
    return bytes(body)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError("fetching the image timed out")
    return left


# -- addresses and hosts ----------------------------------------------------------------------------


def is_public_address(address: IPAddress) -> bool:
    """Whether an address is globally routable unicast, looking through IPv6 forms that embed an IPv4 address."""
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    refused = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )
    return not refused and all(is_public_address(a) for a in embedded)


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _normalize_host(host: str) -> str:
    """Lower-case, no trailing dot, no IPv6 brackets, IDNA (punycode) labels; ``ValueError`` if not a host."""
    host = host.strip().rstrip(".").lower()
    ip = _ip_or_none(host)
    if ip is not None:
        return ip.compressed
    if not host.isascii():
        try:
            host = httpx.URL(f"http://{host}/").raw_host.decode("ascii")
        except (httpx.InvalidURL, ValueError, UnicodeError):
            raise ValueError(f"not a host name: {host!r}") from None
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"not a host name: {host!r}")
    return host


def _normalize_host_or_raw(host: str) -> str:
    try:
        return _normalize_host(host)
    except ValueError:
        return host


def _normalize_entry(entry: str) -> str:
    entry = entry.strip()
    if entry.startswith("*."):
        rest = entry[2:]
        if _ip_or_none(rest) is not None or "." not in rest.rstrip("."):
            raise ValueError(f"invalid allowed media domain {entry!r}: a wildcard needs a domain like *.example.com")
        try:
            return "*." + _normalize_host(rest)
        except ValueError:
            raise ValueError(f"invalid allowed media domain {entry!r}") from None
    if "*" in entry or "/" in entry:
        raise ValueError(f"invalid allowed media domain {entry!r}: use a host name, an IP, or *.example.com")
    try:
        return _normalize_host(entry)
    except ValueError:
        raise ValueError(f"invalid allowed media domain {entry!r}: use a host name, an IP, or *.example.com") from None
