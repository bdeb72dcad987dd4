"""The way to the upstream: an egress proxy from the environment or the config, or straight.

`gateway/policy/egress.py`.
"""

from __future__ import annotations

import pytest

from gateway.config.load import ConfigError, load_settings
from gateway.policy.egress import EgressError, proxy_route

from .support import ENVIRON, config_yaml

API = "https://api.anthropic.com"


@pytest.mark.parametrize(
    ("upstream", "environ", "proxy"),
    [
        (API, {}, None),
        (API, {"HTTPS_PROXY": "http://egress:3128"}, "http://egress:3128"),
        (API, {"https_proxy": "http://lower:3128"}, "http://lower:3128"),
        (API, {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128"}, "http://upper:3128"),
        (API, {"HTTPS_PROXY": "egress:3128"}, "http://egress:3128"),  # no scheme: http, as curl and Go
        (API, {"HTTPS_PROXY": "https://egress:8443"}, "https://egress:8443"),  # aiohttp would go direct
        (API, {"HTTP_PROXY": "http://egress:3128"}, None),  # an https upstream takes HTTPS_PROXY only
        ("http://api.internal:8080", {"HTTP_PROXY": "http://egress:3128"}, "http://egress:3128"),
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "*"}, None),
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "anthropic.com"}, None),  # the host's domain
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": ".anthropic.com"}, None),  # a suffix
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "*.anthropic.com"}, None),
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "thropic.com"}, "http://egress:3128"),
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "api.anthropic.com:443"}, None),
        (API, {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "api.anthropic.com:8443"}, "http://egress:3128"),
        (API, {"HTTPS_PROXY": "http://egress:3128", "no_proxy": " .svc , API.Anthropic.com "}, None),
        ("https://10.1.2.3", {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "10.0.0.0/8"}, None),  # CIDR
        ("https://11.1.2.3", {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "10.0.0.0/8"}, "http://egress:3128"),
        ("https://[fd00::5]", {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "fd00::/8"}, None),
        ("https://api.ns.svc", {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": ".svc"}, None),
        ("https://127.0.0.1:8443", {"HTTPS_PROXY": "http://egress:3128"}, None),  # loopback: never, as Go
        ("https://localhost", {"HTTPS_PROXY": "http://egress:3128"}, None),
        # Only `localhost` itself: `api.localhost` may resolve through a cluster's search path to any pod.
        ("https://api.localhost", {"HTTPS_PROXY": "http://egress:3128"}, "http://egress:3128"),
    ],
)
def test_the_proxy_comes_from_the_standard_variables_as_curl_and_go_read_them(
    upstream: str, environ: dict[str, str], proxy: str | None
) -> None:
    route = proxy_route(upstream, None, True, environ)
    assert (str(route.proxy) if route.proxy else None) == proxy, route.source


def test_an_explicit_proxy_wins_and_the_environment_can_be_ignored() -> None:
    environ = {"HTTPS_PROXY": "http://from-env:3128", "NO_PROXY": "*"}
    assert str(proxy_route(API, "http://explicit:3128", True, environ).proxy) == "http://explicit:3128"
    assert proxy_route(API, None, False, environ).proxy is None


def test_the_route_as_logged_never_shows_the_proxy_password() -> None:
    route = proxy_route(API, None, True, {"HTTPS_PROXY": "http://user:s3cret-pass@egress:3128"})
    assert "s3cret-pass" not in route.shown
    assert route.shown == "http://egress:3128 (from HTTPS_PROXY)"


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"HTTPS_PROXY": "socks5://egress:1080"}, "HTTPS_PROXY: socks5:// proxies are not supported"),
        ({"HTTPS_PROXY": "http://"}, "HTTPS_PROXY: the proxy URL has no host"),
        ({"HTTPS_PROXY": "http://egress:3128/path"}, "a scheme, host and port only"),
        # Excluded by NO_PROXY, and still a mistake worth saying: it would bite the next upstream.
        ({"HTTPS_PROXY": "socks5://egress:1080", "NO_PROXY": "*"}, "socks5:// proxies are not supported"),
    ],
)
def test_a_proxy_the_gateway_cannot_use_is_refused_never_bypassed(environ: dict[str, str], problem: str) -> None:
    """aiohttp drops an https:// or socks proxy from the environment with a warning and connects straight
    to the upstream (aio-libs/aiohttp#3075): a cluster whose egress must see every connection would not."""
    with pytest.raises(EgressError, match=problem):
        proxy_route(API, None, True, environ)
    with pytest.raises(ConfigError) as raised:
        load_settings(config_yaml(API), {**ENVIRON, **environ})
    assert "upstream.proxy: " in str(raised.value)


def test_proxy_credentials_come_from_a_secret_and_must_be_user_colon_password() -> None:
    config = config_yaml(API, "upstream: {proxy: {url: 'http://egress:3128', credentials_env: PROXY_AUTH}}")
    settings = load_settings(config, {**ENVIRON, "PROXY_AUTH": "gateway:pr0xy-pass"})
    assert settings.upstream.proxy.credentials is not None
    assert "pr0xy-pass" in settings.secret_values()  # scrubbed from every log line
    with pytest.raises(ConfigError, match=r"upstream\.proxy\.credentials: must be user:password"):
        load_settings(config, {**ENVIRON, "PROXY_AUTH": "no-colon"})


def test_credentials_in_the_environments_proxy_url_are_used_and_never_shown() -> None:
    route = proxy_route(API, None, True, {"HTTPS_PROXY": "https://gateway:pr0xy-pass@egress:8443"})
    assert route.credentials == ("gateway", "pr0xy-pass")
    assert route.address == "https://egress:8443"  # what is connected to: without them


@pytest.mark.parametrize("url", ["http://gateway:pr0xy-pass@egress:3128", "gateway:pr0xy-pass@egress:3128"])
def test_credentials_in_the_configs_proxy_url_are_refused(url: str) -> None:
    """Secrets come from environment variables or files, never the config (nor the admin API's view of it),
    with a scheme or without one (read as http://)."""
    config = config_yaml(API, f"upstream: {{proxy: {{url: '{url}'}}}}")
    with pytest.raises(ConfigError, match=r"upstream\.proxy\.url: holds credentials"):
        load_settings(config, ENVIRON)


def test_a_percent_encoded_proxy_password_is_decoded_as_curl_reads_it() -> None:
    route = proxy_route(API, None, True, {"HTTPS_PROXY": "http://gate%40way:p%40ss@egress:3128"})
    assert route.credentials == ("gate@way", "p@ss")


@pytest.mark.parametrize(
    ("base_url", "extra", "refused"),
    [
        ("http://api.internal:8080", "", True),
        ("http://api.internal:8080", ", allow_insecure_http: true", False),
        ("http://127.0.0.1:8000", "", False),  # a sidecar, or the simulator
        ("https://api.internal", "", False),
    ],
)
def test_keys_are_never_sent_in_clear_off_loopback_unless_allowed(base_url: str, extra: str, refused: bool) -> None:
    config = config_yaml(base_url, f"upstream: {{base_url: '{base_url}'{extra}}}")
    if refused:
        with pytest.raises(ConfigError, match=r"upstream\.base_url: http:// sends the environment keys in clear"):
            load_settings(config, ENVIRON)
    else:
        load_settings(config, ENVIRON)
