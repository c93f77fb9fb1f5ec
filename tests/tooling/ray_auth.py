"""Ray token authentication for the clusters that tests and benchmarks start.

``use_token_auth()`` turns token authentication on for this process and every Ray process it starts
(``RAY_AUTH_MODE=token``) and makes sure a token is configured: the one ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` already names, else a fresh one written to a private file (mode 0600, in a
folder of its own that is removed when this process exits) and named by ``RAY_AUTH_TOKEN_PATH``.
The user's ``~/.ray/auth_token`` is neither read nor written. Call it before Ray is first used in the
process: Ray reads the token once and caches it.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def write_token_file(path: Path) -> str:
    """Write a new random token (64 hex digits, as ``ray get-auth-token --generate`` makes) to ``path``,
    created with mode 0600 (it must not exist yet). Returns the token."""
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def use_token_auth(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set ``RAY_AUTH_MODE=token`` in ``environ`` and return the token Ray will use (see the module docstring).

    Raises:
        RuntimeError: if ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file.
    """
    environ["RAY_AUTH_MODE"] = "token"
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip()
    if environ.get(TOKEN_PATH_ENV):
        path = Path(environ[TOKEN_PATH_ENV])
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise RuntimeError(f"{TOKEN_PATH_ENV}={path} names a missing or empty token file")
        return token
    folder = tempfile.mkdtemp(prefix="ray-token-")  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "auth_token"
    token = write_token_file(path)
    environ[TOKEN_PATH_ENV] = str(path)
    return token


def auth_headers(token: str) -> dict[str, str]:
    """HTTP headers that authenticate a request to a token-protected Ray dashboard (job, Serve, state APIs)."""
    return {"Authorization": f"Bearer {token}"}
