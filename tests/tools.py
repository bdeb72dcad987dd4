"""Finding the external tools some tests need: skipped with a clear message locally, a failure in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def require(tool: str, install: str) -> str:
    path = shutil.which(tool)
    if path is not None:
        return path
    message = f"{tool} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have it: .ci/run installs it")
    pytest.skip(f"{message}; with CI=true this is a failure")
