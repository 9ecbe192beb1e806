"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status.

OpenAI's API reference ("Error codes") pairs each status with a type, and the official clients map
the status to an exception class (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
413 APIStatusError, 429 RateLimitError, 5xx InternalServerError), so the status and the body are
the contract. The message always says what is wrong and what to do.
"""

from __future__ import annotations

import json

# The `type` OpenAI sends with each status; the client reads it into `APIError.type`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client; raised anywhere while handling a request."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def safe_text(text: str | None) -> str | None:
    """`text` with what UTF-8 cannot encode (a lone surrogate such as "\\ud800", which JSON lets a client send)
    written as a backslash escape: an error message that echoes a client's value must still encode, or the error
    itself becomes a 500."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": safe_text(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": safe_text(param), "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def show(value, limit: int = 60) -> str:
    """A short JSON rendering of a client's value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = safe_text(text)
    return text if len(text) <= limit else text[:limit] + "..."
