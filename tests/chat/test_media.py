"""chat/media.py: image loading limits, data: URLs, and the remote fetch path against a loopback server."""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image, PngImagePlugin

from small4.chat.media import (
    LoadedImage,
    MediaError,
    MediaPolicy,
    is_public_address,
    load_image,
    parse_allowed_domains,
)
from small4.chat.render import ChatRenderer, RenderError
from small4.tokenizer import Tokenizer
from small4.weights.tekken_tiny import write_tiny_tekken


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


PNG = encode(Image.new("RGB", (60, 40), "red"), "PNG")
JPEG = encode(Image.new("RGB", (32, 48), "blue"), "JPEG")
DEFAULT = MediaPolicy()


# -- data: URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "mime", "size"), [(PNG, "image/png", (60, 40)), (JPEG, "image/jpeg", (32, 48))])
def test_data_url_ok(raw: bytes, mime: str, size: tuple[int, int]) -> None:
    loaded = load_image(data_url(raw, mime), DEFAULT)
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.size == size
    assert loaded.sha256 == hashlib.sha256(raw).digest()
    assert loaded.num_bytes == len(raw)
    loaded.image.getpixel((0, 0))  # decoded already


def test_data_url_hash_is_of_the_bytes_not_the_pixels() -> None:
    same_pixels = encode(Image.new("RGB", (60, 40), "red"), "PNG") + b""
    assert load_image(data_url(same_pixels), DEFAULT).sha256 == load_image(data_url(PNG), DEFAULT).sha256
    other = encode(Image.new("RGB", (60, 40), "green"), "PNG")
    assert load_image(data_url(other), DEFAULT).sha256 != load_image(data_url(PNG), DEFAULT).sha256


def truncated_png() -> bytes:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    raw = encode(noisy, "PNG")
    return raw[: len(raw) // 2]


DATA_ERRORS = [
    ("data:image/png;base64,!!!not-base64!!!", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(PNG).decode()[:-1], "not valid base64"),  # bad padding
    ("data:image/png;base64,iVBO Rw0K", "not valid base64"),  # whitespace is not tolerated
    (data_url(b"definitely not an image"), "not a decodable image"),
    (data_url(truncated_png()), "truncated or corrupt"),
    (data_url(png_header(0, 10)), "decodable image|zero size"),
    (data_url(png_header(10, 0)), "decodable image|zero size"),
    (data_url(png_header(7000, 7000)), "over the limit of 40000000 pixels"),
    (data_url(png_header(100_000, 100_000)), "pixels"),
    ("data:image/png;base64,", "empty"),
    ("data:text/plain;base64,aGVsbG8=", "base64 data: URLs"),
    ("data:;base64,aGVsbG8=", "base64 data: URLs"),
    ("data:image/png," + "abc", "base64 data: URLs"),
    ("file:///etc/passwd", "base64 data: URLs"),
    ("ftp://example.com/a.png", "base64 data: URLs"),
]


@pytest.mark.parametrize(("url", "match"), DATA_ERRORS)
def test_data_url_errors(url: str, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        load_image(url, DEFAULT)


def test_huge_dimensions_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(MediaError, match="pixels"):
        load_image(data_url(png_header(7000, 7000)), DEFAULT)
    with pytest.raises(MediaError, match="pixels"):
        load_image(data_url(png_header(100_000, 100_000)), DEFAULT)


def test_pixel_limit_is_per_policy() -> None:
    url = data_url(PNG)  # 60 x 40 = 2400 pixels
    assert load_image(url, MediaPolicy(max_pixels=2400)).image.size == (60, 40)
    with pytest.raises(MediaError, match="2400 pixels, over the limit of 2399"):
        load_image(url, MediaPolicy(max_pixels=2399))


def test_byte_cap_checked_on_encoded_length_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = MediaPolicy(max_image_bytes=len(PNG))
    assert load_image(data_url(PNG), policy).num_bytes == len(PNG)
    with pytest.raises(MediaError, match="larger than the limit"):
        load_image(data_url(PNG + b"\0" * 4), policy)

    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("base64 decoded")

    monkeypatch.setattr(base64, "b64decode", no_decoding)
    with pytest.raises(MediaError, match="larger than the limit of 1000 bytes"):
        load_image("data:image/png;base64," + "A" * 2000, MediaPolicy(max_image_bytes=1000))


def test_formats_outside_the_allowlist_are_refused() -> None:
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(MediaError, match="decodable image"):
        load_image(data_url(tiff, "image/tiff"), DEFAULT)


# -- policy -----------------------------------------------------------------------------------------


def test_allowlist_matching() -> None:
    policy = MediaPolicy(allowed_domains=frozenset({"Images.Example.COM.", "*.cdn.test", "[::1]", "127.0.0.1"}))
    assert policy.allowed_domains == frozenset({"images.example.com", "*.cdn.test", "::1", "127.0.0.1"})
    assert policy.allows_host("images.example.com")
    assert policy.allows_host("IMAGES.example.com.")
    assert not policy.allows_host("example.com")
    assert not policy.allows_host("evil-images.example.com")
    assert policy.allows_host("a.cdn.test") and policy.allows_host("a.b.cdn.test")
    assert not policy.allows_host("cdn.test")  # a wildcard matches subdomains only
    assert not policy.allows_host("evilcdn.test")
    assert policy.allows_host("::1") and policy.allows_host("[0:0::1]")
    assert policy.allows_host("127.0.0.1") and not policy.allows_host("127.0.0.2")


def test_parse_allowed_domains() -> None:
    assert parse_allowed_domains("a.com, *.b.com  c.org") == frozenset({"a.com", "*.b.com", "c.org"})
    assert parse_allowed_domains(["a.com,b.com", "bücher.de"]) == frozenset({"a.com", "b.com", "xn--bcher-kva.de"})
    assert parse_allowed_domains(None) == frozenset() == parse_allowed_domains("")
    for bad in ("*", "*.com", "a.*.com", "http://a.com", "a.com:8080", "a_b.com", "*.127.0.0.1"):
        with pytest.raises(ValueError):
            parse_allowed_domains(bad)


@pytest.mark.parametrize(
    "field",
    [
        {"max_images": 0},
        {"max_image_bytes": 0},
        {"max_pixels": -1},
        {"fetch_timeout_s": 0},
        {"max_total_pixels": 0},
        {"max_concurrent_decodes": 0},
    ],
)
def test_policy_validates_itself(field: dict) -> None:
    with pytest.raises(ValueError):
        MediaPolicy(**field)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1::1", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 around 169.254.169.254
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


# -- remote URLs ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sent: dict[str, int] = {}

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout tests)
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: C901 - a route table
        path = self.path
        if path == "/ok.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/host":
            self._send(200, self.headers.get("Host", "").encode())
        elif path == "/notimage":
            self._send(200, b"<html>hello</html>", {"Content-Type": "text/html"})
        elif path == "/missing":
            self._send(404, b"nope")
        elif path == "/gzip":
            self._send(200, zlib.compress(PNG), {"Content-Encoding": "gzip"})
        elif path == "/too-long":  # honest Content-Length, over the cap
            self._send(200, b"\0" * 4096)
        elif path in ("/endless", "/endless-chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if path == "/endless-chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")  # no length: the body runs until the socket closes
            self.end_headers()
            block = b"\0" * 65536
            sent = 0
            try:
                while sent < 512 * 1024 * 1024:
                    if path == "/endless-chunked":
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    else:
                        self.wfile.write(block)
                    sent += len(block)
            except OSError:
                pass
            finally:
                _Handler.sent[path] = sent
                self.close_connection = True
        elif path == "/slow":
            time.sleep(3)
            self._send(200, PNG)
        elif path == "/drip":  # a byte at a time, forever: only an overall deadline stops it
            self.send_response(200)
            self.send_header("Content-Length", str(10**6))
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        elif path == "/redirect-local":
            self._send(302, headers={"Location": "/ok.png"})
        elif path == "/redirect-localhost":
            port = self.server.server_address[1]
            self._send(302, headers={"Location": f"http://localhost:{port}/ok.png"})
        elif path == "/redirect-external":
            self._send(302, headers={"Location": "http://evil.example/x.png"})
        elif path == "/redirect-loop":
            self._send(302, headers={"Location": "/redirect-loop"})
        elif path == "/redirect-nolocation":
            self._send(302)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


LOOPBACK = MediaPolicy(allowed_domains=frozenset({"127.0.0.1"}), allow_private_addresses=True, fetch_timeout_s=5.0)


def test_remote_refused_by_default() -> None:
    for url in ("https://example.com/cat.png", "http://example.com/cat.png", "HTTPS://example.com/cat.png"):
        with pytest.raises(MediaError, match="remote image URLs are disabled"):
            load_image(url, DEFAULT)


def test_remote_refused_for_other_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network(monkeypatch)
    policy = MediaPolicy(allowed_domains=frozenset({"images.example.com", "*.cdn.example.com"}))
    for url in ("https://example.com/cat.png", "https://cdn.example.com/x.png", "http://evil.test/a.png"):
        with pytest.raises(MediaError, match="not among the allowed media domains"):
            load_image(url, policy)
    with pytest.raises(MediaError, match="credentials"):
        load_image("https://user:pw@images.example.com/a.png", policy)
    with pytest.raises(MediaError, match="base64 data: URLs .*or http"):
        load_image("file:///etc/passwd", policy)


def test_remote_ok(server: str) -> None:
    loaded = load_image(f"{server}/ok.png", LOOPBACK)
    assert loaded.image.size == (60, 40)
    assert loaded.sha256 == hashlib.sha256(PNG).digest()


def test_remote_connects_to_the_checked_address_with_the_original_host(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``localhost`` is resolved once by us; httpx gets the IP, the Host header keeps the name."""
    sent: list[httpx.Request] = []
    real_send = httpx.Client.send

    def spy(self: httpx.Client, request: httpx.Request, **kwargs: object) -> httpx.Response:
        sent.append(request)
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", spy)
    port = server.rsplit(":", 1)[1]
    policy = MediaPolicy(allowed_domains=frozenset({"localhost"}), allow_private_addresses=True)
    with pytest.raises(MediaError, match="not a decodable image"):
        load_image(f"http://localhost:{port}/host", policy)  # the body echoes the Host header: not an image
    assert sent[0].url.host in ("127.0.0.1", "::1")
    assert sent[0].headers["host"] == f"localhost:{port}"
    assert sent[0].headers["accept-encoding"] == "identity"


def test_remote_errors(server: str) -> None:
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(f"{server}/missing", LOOPBACK)
    with pytest.raises(MediaError, match="not a decodable image"):
        load_image(f"{server}/notimage", LOOPBACK)
    with pytest.raises(MediaError, match="Content-Encoding 'gzip'"):
        load_image(f"{server}/gzip", LOOPBACK)


def test_remote_byte_cap_from_content_length(server: str) -> None:
    with pytest.raises(MediaError, match=r"larger than the limit of 1000 bytes \(Content-Length 4096\)"):
        load_image(f"{server}/too-long", replace(LOOPBACK, max_image_bytes=1000))


@pytest.mark.parametrize("path", ["/endless", "/endless-chunked"])
def test_remote_byte_cap_enforced_while_streaming(server: str, path: str) -> None:
    policy = replace(LOOPBACK, max_image_bytes=256 * 1024)
    start = time.monotonic()
    with pytest.raises(MediaError, match="larger than the limit of 262144 bytes"):
        load_image(f"{server}{path}", policy)
    assert time.monotonic() - start < 2.0
    deadline = time.monotonic() + 2.0
    while path not in _Handler.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    # The server stopped on a broken pipe long before its 512 MiB: the client did not read on.
    assert _Handler.sent[path] < 64 * 1024 * 1024


def test_remote_slow_server_times_out(server: str) -> None:
    policy = replace(LOOPBACK, fetch_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        load_image(f"{server}/slow", policy)
    assert time.monotonic() - start < 1.0


def test_remote_dripping_server_hits_the_overall_deadline(server: str) -> None:
    policy = replace(LOOPBACK, fetch_timeout_s=0.4)
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        load_image(f"{server}/drip", policy)
    assert time.monotonic() - start < 1.2


def test_remote_redirects(server: str) -> None:
    assert load_image(f"{server}/redirect-local", LOOPBACK).sha256 == hashlib.sha256(PNG).digest()
    with pytest.raises(MediaError, match="'evil.example' is not among the allowed media domains"):
        load_image(f"{server}/redirect-external", LOOPBACK)
    with pytest.raises(MediaError, match="'localhost' is not among the allowed media domains"):
        load_image(f"{server}/redirect-localhost", LOOPBACK)  # same machine, other host name: refused
    with pytest.raises(MediaError, match="redirected more than 3 times"):
        load_image(f"{server}/redirect-loop", LOOPBACK)
    with pytest.raises(MediaError, match="without a Location"):
        load_image(f"{server}/redirect-nolocation", LOOPBACK)
    with pytest.raises(MediaError, match="redirected more than 0 times"):
        load_image(f"{server}/redirect-local", replace(LOOPBACK, max_redirects=0))


def test_redirect_to_a_private_address_is_refused(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed host redirecting to another allowed host that resolves to a private address: refused."""
    import small4.chat.media as media

    # The test server's 127.0.0.1 plays a public address; "localhost" resolves to a private one.
    real = media.is_public_address
    monkeypatch.setattr(media, "is_public_address", lambda a: str(a) == "127.0.0.1" or real(a))

    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host != "localhost":  # the connect to the literal 127.0.0.1 goes through getaddrinfo too
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    policy = MediaPolicy(allowed_domains=frozenset({"127.0.0.1", "localhost"}))
    assert load_image(f"{server}/redirect-local", policy).image.size == (60, 40)  # the first hop is fine
    with pytest.raises(MediaError, match=r"'localhost' resolves to a non-public address \(10.0.0.5\)"):
        load_image(f"{server}/redirect-localhost", policy)


def forbid_network(monkeypatch: pytest.MonkeyPatch, dns: bool = False) -> None:
    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("a DNS lookup was attempted")

    monkeypatch.setattr(httpx.Client, "send", no_connection)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    if not dns:
        monkeypatch.setattr(socket, "getaddrinfo", no_dns)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "10.0.0.1", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "192.168.0.1"]
)
def test_private_literal_addresses_refused_without_connecting(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network(monkeypatch)
    policy = MediaPolicy(allowed_domains=frozenset({host}))
    with pytest.raises(MediaError, match="non-public address"):
        load_image(f"http://{host}/latest/meta-data", policy)
    with pytest.raises(MediaError, match="non-public address"):
        load_image(f"https://{host}:8443/a.png", policy)


def test_localhost_refused_even_if_allowlisted(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network(monkeypatch, dns=True)  # the name is resolved, but nothing connects
    with pytest.raises(MediaError, match="'localhost' resolves to a non-public address"):
        load_image("http://localhost/a.png", MediaPolicy(allowed_domains=frozenset({"localhost"})))


def test_any_private_resolved_address_refuses_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        assert host == "images.example.com"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    forbid_network(monkeypatch)
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(MediaError, match=r"non-public address \(10.1.2.3\)"):
        load_image("https://images.example.com/a.png", MediaPolicy(allowed_domains=frozenset({"images.example.com"})))


def test_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    forbid_network(monkeypatch)
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(MediaError, match="could not be resolved"):
        load_image("https://images.example.com/a.png", MediaPolicy(allowed_domains=frozenset({"images.example.com"})))


# -- render -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    write_tiny_tekken(path)
    return Tokenizer.from_file(path)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_render_image_hashes_in_prompt_order(tokenizer: Tokenizer) -> None:
    renderer = ChatRenderer(tokenizer.mistral)
    blue = encode(Image.new("RGB", (28, 28), "blue"), "PNG")
    messages = [
        {"role": "user", "content": [image_part(data_url(PNG)), {"type": "text", "text": "and"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [image_part(data_url(JPEG, "image/jpeg")), image_part(data_url(blue))]},
    ]
    out = renderer.render(messages)
    assert out.image_hashes == [hashlib.sha256(b).digest() for b in (PNG, JPEG, blue)]
    assert len(out.images) == 3
    assert renderer.render([{"role": "user", "content": "no images"}]).image_hashes == []


def test_render_too_many_images(tokenizer: Tokenizer) -> None:
    renderer = ChatRenderer(tokenizer.mistral, media_policy=MediaPolicy(max_images=2))
    url = data_url(PNG)
    ok = renderer.render([{"role": "user", "content": [image_part(url), image_part(url)]}])
    assert len(ok.image_hashes) == 2
    messages = [
        {"role": "user", "content": [image_part(url), image_part(url)]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, image_part(url)]},
    ]
    with pytest.raises(RenderError, match="too many images: at most 2 per request") as info:
        renderer.render(messages)
    assert info.value.param == "messages[2].content[1].image_url"


def test_render_media_errors_become_render_errors(tokenizer: Tokenizer) -> None:
    renderer = ChatRenderer(tokenizer.mistral, media_policy=MediaPolicy(max_pixels=100))
    with pytest.raises(RenderError, match="over the limit of 100 pixels") as info:
        renderer.render([{"role": "user", "content": [image_part(data_url(PNG))]}])
    assert info.value.param == "messages[0].content[0].image_url"


def test_render_remote_image(tokenizer: Tokenizer, server: str) -> None:
    renderer = ChatRenderer(tokenizer.mistral, media_policy=LOOPBACK)
    remote = renderer.render([{"role": "user", "content": [image_part(f"{server}/ok.png")]}])
    inline = ChatRenderer(tokenizer.mistral).render([{"role": "user", "content": [image_part(data_url(PNG))]}])
    assert remote.token_ids == inline.token_ids
    assert remote.image_hashes == inline.image_hashes == [hashlib.sha256(PNG).digest()]


@pytest.mark.parametrize(("cap", "most"), [(2, 2), (5, 5)])
def test_concurrent_decodes_are_capped_per_process(monkeypatch, cap: int, most: int) -> None:
    """The real PNG decoder, slowed down and counted: at most ``max_concurrent_decodes`` run at once (and with
    a larger cap more do, so the count can see concurrency)."""
    active, peak, lock = 0, 0, threading.Lock()
    real_load = PngImagePlugin.PngImageFile.load

    def counted_load(self):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.1)
            return real_load(self)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counted_load)
    policy = MediaPolicy(max_concurrent_decodes=cap)
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: load_image(data_url(PNG), policy).image.size, range(8)))
    assert sizes == [(60, 40)] * 8
    assert peak == most


def test_large_images_come_back_shrunk_to_max_side() -> None:
    jpeg = encode(Image.new("RGB", (4000, 3000), "green"), "JPEG")
    loaded = load_image(data_url(jpeg, "image/jpeg"), DEFAULT, max_side=1000)
    assert loaded.image.size == (1000, 750) and loaded.source_pixels == 12_000_000
    one_bit = encode(Image.new("1", (3000, 100), 1), "PNG")
    shrunk = load_image(data_url(one_bit), DEFAULT, max_side=1500).image
    assert shrunk.size == (1500, 50) and shrunk.mode == "L"
    assert load_image(data_url(PNG), DEFAULT, max_side=1000).image.size == (60, 40)  # fits: untouched
    with pytest.raises(MediaError, match="in all"):
        load_image(data_url(jpeg, "image/jpeg"), DEFAULT, max_side=1000, pixel_budget=11_999_999)
