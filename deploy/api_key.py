"""Optional API key of the HTTP API: ``Authorization: Bearer <key>`` on every endpoint but ``/healthz``.

The ingress ``user_config`` names the environment variable that holds the key (``api_key_env``,
``DDPM_API_KEY`` in ``deploy/serve_config.yaml``); the variable is read in the ingress replica when
its user_config is applied. Unset or empty: no key is required (a local cluster). Set: a request
without the header, with another scheme or with a different key gets 401
``{"error": "Authorization: ...", "field": "Authorization"}`` with ``WWW-Authenticate: Bearer``.
Keys are compared with ``secrets.compare_digest``.

The key lives in this module (one ingress replica per process), so that the FastAPI dependency
``require_api_key``, which Serve resolves by reference in the replica, sees what
``configure_api_key`` set there.
"""

from __future__ import annotations

import os
import secrets

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deploy.errors import RequestError

_bearer = HTTPBearer(auto_error=False, description="the API key, when the server requires one")
_expected: dict[str, bytes | None] = {"key": None}


class ApiKeyError(RequestError):
    """401 naming the ``Authorization`` header; ``headers`` go on the response (``WWW-Authenticate``)."""

    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, message: str) -> None:
        super().__init__(401, "Authorization", message)

    def __reduce__(self):  # picklable despite the one-argument constructor
        return (type(self), (self.message,))


def configure_api_key(env_var: str | None) -> bool:
    """Require the key held by environment variable ``env_var`` (none if ``env_var`` is None, or the
    variable is unset or empty). Returns whether a key is now required."""
    key = os.environ.get(env_var, "") if env_var else ""
    _expected["key"] = key.encode() if key else None
    return bool(key)


async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """FastAPI dependency: raise ``ApiKeyError`` unless no key is required or the request carries it."""
    expected = _expected["key"]
    if expected is None:
        return
    if credentials is None:
        raise ApiKeyError("this endpoint needs the header 'Authorization: Bearer <API key>'")
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise ApiKeyError("the API key is not valid")
