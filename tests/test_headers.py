"""Header policy, both directions.

Checks `gateway/policy/headers.py`.
"""

from __future__ import annotations

from gateway.config.settings import HeaderSettings
from gateway.policy.credentials import Inject, PassThrough
from gateway.policy.headers import merge_betas, request_headers, response_headers

SETTINGS = HeaderSettings("2023-06-01", ("managed-agents-2026-04-01", "files-api-2025-04-14"))


def test_betas_merge_in_order_without_duplicates() -> None:
    assert merge_betas(["a, managed-agents-2026-04-01", "b,a"], SETTINGS.anthropic_beta) == (
        "a,managed-agents-2026-04-01,b,files-api-2025-04-14"
    )
    assert merge_betas([], ("x",)) == "x"
    assert merge_betas([" , "], ()) == ""


def test_request_headers() -> None:
    out = request_headers(
        [
            ("Host", "gateway:8080"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Expect", "100-continue"),
            ("Authorization", "Bearer client-token"),
            ("x-api-key", "client-token"),
            ("anthropic-beta", "z"),
            ("anthropic-version", "2024-01-01"),
            ("X-Trace", "a"),
            ("X-Trace", "b"),
            ("Content-Length", "12"),
        ],
        credential=Inject("authorization", "Bearer real"),
        settings=SETTINGS,
    )
    assert out == [
        ("anthropic-version", "2024-01-01"),
        ("X-Trace", "a"),
        ("X-Trace", "b"),
        ("Content-Length", "12"),
        ("anthropic-beta", "z,managed-agents-2026-04-01,files-api-2025-04-14"),
        ("authorization", "Bearer real"),
    ]


def test_pass_through_keeps_the_client_credential_and_adds_the_version() -> None:
    out = request_headers([("Authorization", "Bearer theirs")], credential=PassThrough(), settings=SETTINGS)
    assert out == [
        ("Authorization", "Bearer theirs"),
        ("anthropic-beta", "managed-agents-2026-04-01,files-api-2025-04-14"),
        ("anthropic-version", "2023-06-01"),
    ]


def test_response_headers_keep_what_clients_read() -> None:
    upstream = [
        ("request-id", "req_1"),
        ("retry-after", "3"),
        ("anthropic-ratelimit-requests-remaining", "9"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "drop"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    assert response_headers(upstream) == [
        ("request-id", "req_1"),
        ("retry-after", "3"),
        ("anthropic-ratelimit-requests-remaining", "9"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
