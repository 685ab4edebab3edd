"""The chat page's HTTP surface (no browser): what is open without the key, the CSP, --no-web-ui.

The browser-driven tests are in test_webui_browser.py.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import start_server
from small4.server.webui_routes import CSP


def test_page_and_assets_open_without_key_with_csp(server):
    for path, kind in (("/", "text/html"), ("/webui/app.js", "text/javascript"), ("/webui/style.css", "text/css")):
        r = httpx.get(server.base_url + path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(kind)
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(server.base_url + "/").text
    assert '<script src="/webui/app.js"' in page
    assert "<script>" not in page and " on" + "click=" not in page  # nothing a script-src 'self' policy would block
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "default-src 'none'" in CSP


def test_everything_else_still_needs_the_key(server):
    for path in ("/v1/models", "/metrics", "/webui/", "/webui/index.html", "/webui/../v1/models", "/index.html"):
        assert httpx.get(server.base_url + path).status_code == 401, path
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401
    assert "tiny" not in httpx.get(server.base_url + "/").text  # the page does not even name the model


@pytest.fixture(scope="module")
def no_ui_server(tiny_model_dir):
    s = start_server(tiny_model_dir, "--no-web-ui")
    yield s
    s.stop()


def test_no_web_ui_turns_the_page_off(no_ui_server):
    for path in ("/", "/webui/app.js", "/webui/style.css"):
        assert httpx.get(no_ui_server.base_url + path).status_code == 404, path
    assert httpx.get(no_ui_server.base_url + "/v1/models").status_code == 200
