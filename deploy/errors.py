"""Client errors of the DDPM Serve app (no Ray, no torch).

Every failure of a request is a ``RequestError(status, field, message)`` whose ``body()`` is the
``{"error": ..., "field": ...}`` JSON the HTTP layer returns (docs/ARCHITECTURE.md, "Errors and
paths"); ``request_error_from_validation`` turns pydantic / FastAPI validation errors into one.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import ValidationError
from pydantic_core import PydanticCustomError


class RequestError(Exception):
    """A client error: HTTP ``status`` (4xx), the offending ``field`` and a human ``message``.

    Picklable (its state lives in ``args``), so a replica can hand it back to the ingress as a
    value. ``str(err)`` is ``"<field>: <message>"``.
    """

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(status, field, message)

    @property
    def status(self) -> int:
        """HTTP status code, 413 for a request over a limit, 422 (or 400) for bad input."""
        return self.args[0]

    @property
    def field(self) -> str:
        """Dotted name of the offending request field (``"body"`` for the request as a whole)."""
        return self.args[1]

    @property
    def message(self) -> str:
        """What is wrong and what is allowed."""
        return self.args[2]

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def body(self) -> dict[str, str]:
        """The JSON body sent to the client: ``{"error": "<field>: <message>", "field": field}``."""
        return {"error": str(self), "field": self.field}


FIELD_ERROR = "request_field"
"""pydantic error type of the checks across fields (``field_error``); its ``ctx["field"]`` is the field to name."""


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error, raised in a ``model_validator``, that ``request_error_from_validation``
    reports as a 422 naming ``field`` (instead of the request body as a whole)."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


def request_error_from_validation(err: ValidationError | Sequence[dict[str, Any]], prefix: str = "") -> RequestError:
    """Turn pydantic/FastAPI validation errors into one 422 ``RequestError`` naming the first bad field.

    Args:
        err: a pydantic ``ValidationError`` or the list of error dicts of FastAPI's
            ``RequestValidationError.errors()`` (each with ``loc``, ``msg``, ``type``).
        prefix: prepended to the field name (e.g. ``"form."``); a leading ``"body"`` location
            component is dropped.
    """
    errors = err.errors() if isinstance(err, ValidationError) else list(err)
    if not errors:
        return RequestError(422, "body", "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = prefix + ".".join(loc) if loc else "body"
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == FIELD_ERROR:  # a check across fields that names the field it blames
        field = prefix + str(first["ctx"]["field"])
    elif first.get("type") == "extra_forbidden":
        message = "unknown field (not part of this endpoint's request schema)"
    elif "input" in first and first.get("type") != "json_invalid":
        message = f"{message} (got {_short_repr(first['input'])})"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return RequestError(422, field, message + more)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
