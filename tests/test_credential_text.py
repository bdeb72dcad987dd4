"""Credentials read the same way everywhere (`gateway/policy/credential_text.py`)."""

from __future__ import annotations

import base64
import binascii

import pytest

from gateway.policy.credential_text import b64decode_unpadded, bearer_value, token_digest


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Bearer tok", "tok"),
        ("bearer tok", "tok"),  # the scheme is case-insensitive (RFC 9110)
        ("BEARER   tok  ", "tok"),
        ("Bearer", ""),  # a Bearer with nothing: a credential, and an empty one
        ("Basic dXNlcjpwYXNz", None),
        ("tok", None),
        ("", None),
        (None, None),
    ],
)
def test_a_bearer_value_is_read_whatever_its_spacing_and_case(header: str | None, value: str | None) -> None:
    assert bearer_value(header) == value


@pytest.mark.parametrize("text", ["a", "ab", "abc", "abcd", "user:hgw-token"])
def test_base64_is_read_with_or_without_its_padding(text: str) -> None:
    for urlsafe, encode in ((False, base64.b64encode), (True, base64.urlsafe_b64encode)):
        encoded = encode(text.encode()).decode()
        assert b64decode_unpadded(encoded, urlsafe=urlsafe) == text.encode()
        assert b64decode_unpadded(encoded.rstrip("="), urlsafe=urlsafe) == text.encode()


def test_text_that_is_not_base64_is_refused_as_a_value_error() -> None:
    with pytest.raises(binascii.Error):
        b64decode_unpadded("a", urlsafe=True)


def test_a_digest_recognises_a_token_without_holding_it() -> None:
    digest = token_digest("hgw-token-PLANTED")
    assert digest == token_digest("hgw-token-PLANTED")
    assert digest != token_digest("hgw-token-PLANTED ")
    assert "hgw-token" not in digest
    assert len(digest) == 64
