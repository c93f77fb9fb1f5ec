"""Token authentication for the local Ray cluster an entry point starts (``ray.init(address="local")``).

Ray 2.60 turns token authentication on for a new local cluster unless ``RAY_AUTH_MODE=disabled`` is
set, and then generates ``~/.ray/auth_token`` if no token is configured, but with the umask's mode
(0644: readable by every user of the machine). ``init_local_ray`` keeps token authentication on
(``RAY_AUTH_MODE`` unset or ``token``; an explicit ``disabled`` is respected) and, when no token is
configured (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), writes a new one to
``~/.ray/auth_token`` with mode 0600 first, where ``ray`` commands of the same user find it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import ray


def default_token_path() -> Path:
    """Where Ray looks for a token when neither ``RAY_AUTH_TOKEN`` nor ``RAY_AUTH_TOKEN_PATH`` is set."""
    return Path.home() / ".ray" / "auth_token"


def ensure_local_token() -> Path | None:
    """Make sure a token is configured when token authentication is on; returns the file written, if any.

    Nothing is done when ``RAY_AUTH_MODE`` is ``disabled``, ``RAY_AUTH_TOKEN`` is set,
    ``RAY_AUTH_TOKEN_PATH`` is set (Ray reports a missing file itself) or ``~/.ray/auth_token`` exists.
    Otherwise a new token (64 hex digits, like ``ray get-auth-token --generate``) is written to
    ``~/.ray/auth_token`` with mode 0600.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip() or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = default_token_path()
    if path.is_file() and path.stat().st_size > 0:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)  # an empty file left before keeps its mode otherwise
    return path


def init_local_ray(**kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)`` (a new cluster of this process) with token authentication on.

    ``RAY_AUTH_MODE`` is left as it is: unset, ``ray.init`` itself turns token mode on for the new
    cluster (setting the variable here would come too late: Ray reads it when it is imported).
    """
    ensure_local_token()
    ray.init(address="local", **kwargs)


def connect_ray(num_cpus: int | None = None, dashboard_host: str | None = None) -> bool:
    """Connect this process to Ray unless it is already: ``$RAY_ADDRESS`` when set (e.g. under
    ``ray job submit``), else a new local instance with ``num_cpus`` logical CPUs and token
    authentication on (``init_local_ray``): without a dashboard, or with Ray's default dashboard
    process on ``dashboard_host`` when given (Ray Train's controller polls the State API it serves).

    Returns:
        True when this call started a local instance (a cluster of fixed size), else False.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address)
        return False
    if dashboard_host is None:
        init_local_ray(num_cpus=num_cpus, include_dashboard=False)
    else:
        init_local_ray(num_cpus=num_cpus, dashboard_host=dashboard_host)
    return True
