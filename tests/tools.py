"""Finding the external tools some tests need: skipped with a clear message locally, a failure in CI."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require(tool: str, install: str) -> str:
    # The project's own virtualenv first (tools installed with the test extra), then PATH.
    venv_tool = Path(sys.executable).parent / tool
    path = str(venv_tool) if venv_tool.exists() else shutil.which(tool)
    if path is not None:
        return path
    message = f"{tool} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have it: .ci/run installs it")
    pytest.skip(f"{message}; with CI=true this is a failure")
