"""The watch page's link-preview tags: a host's title and name are text in an attribute, never markup."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request

from relay.api.app import create_app
from relay.api.pages import og_tags
from tests.conftest import make_settings


def test_og_tags_escape_what_the_host_wrote(tmp_path):
    app = create_app(make_settings(tmp_path, server={"public_url": "https://relay.example"}))
    request = make_mocked_request("GET", "/watch/b1?token=t%22x", app=app)
    info = {"broadcast_id": "b1", "title": '"><script>alert(1)</script>', "host_name": "<b>Ada</b> & co"}
    html = og_tags(request, info)
    assert "<script>" not in html and "<b>" not in html
    assert '<meta property="og:title" content="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;">' in html
    assert "Watch &lt;b&gt;Ada&lt;/b&gt; &amp; co&#x27;s live stream" in html
    # The shared link is the configured public one, its token quoted.
    assert '<meta property="og:url" content="https://relay.example/watch/b1?token=t%22x">' in html


def test_og_tags_without_a_broadcast_are_generic(tmp_path):
    app = create_app(make_settings(tmp_path))
    html = og_tags(make_mocked_request("GET", "/watch/nope?token=x", app=app), None)
    assert 'property="og:title" content="Live world-model stream"' in html
    assert "og:url" not in html and "og:image" not in html
