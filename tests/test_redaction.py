"""Secrets redacted whole wherever they would show (`gateway/policy/redaction.py`)."""

from __future__ import annotations


def test_the_redactor_replaces_every_secret_whole_in_text_bytes_and_headers() -> None:
    from gateway.policy.redaction import Redactor

    redactor = Redactor(["sk-short", "sk-short-and-longer", ""])
    # The longer secret that contains the shorter one goes whole, not as "<redacted>-and-longer".
    assert redactor.text("a sk-short-and-longer b sk-short") == "a <redacted> b <redacted>"
    assert redactor.body(b'{"echo": "Bearer sk-short-and-longer"}') == b'{"echo": "Bearer <redacted>"}'
    assert redactor.headers([("x-echo", "sk-short"), ("x-other", "fine")]) == [
        ("x-echo", "<redacted>"),
        ("x-other", "fine"),
    ]
    # A reload adds the new secrets and keeps the old ones.
    rotated = redactor.with_(["sk-new"])
    assert rotated.text("sk-new sk-short") == "<redacted> <redacted>"
    assert redactor.text("sk-new") == "sk-new"
