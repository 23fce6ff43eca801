"""How the gateway's refusals and failures become responses: status, JSON naming the problem, Retry-After."""

from __future__ import annotations

import math

from controlplane.gateway.admission import Refused
from controlplane.gateway.inference import BadRequest
from controlplane.gateway.server import ClientConnection, json_error

RETRY_AFTER_NO_SHARD = [(b"retry-after", b"1")]
RETRY_AFTER_MAX_S = 60  # a longer (or unknown: infinite) estimate is a guess; ask again within a minute


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


ANSWERED = (HttpError, BadRequest, Refused)  # the errors that have a response (anything else is a 500)


def retry_after_header(seconds: float) -> bytes:
    """Retry-After in whole seconds, at least 1 (0 would invite an immediate retry storm), at most a minute."""
    return str(max(1, math.ceil(min(seconds, RETRY_AFTER_MAX_S)))).encode()


def refusal_headers(refused: Refused) -> list[tuple[bytes, bytes]]:
    return [] if refused.retry_after_s is None else [(b"retry-after", retry_after_header(refused.retry_after_s))]


def send_error(conn: ClientConnection, error: Exception) -> None:
    """Answer one of the ANSWERED errors."""
    if isinstance(error, HttpError):
        conn.send_json(error.status, json_error(str(error)), error.headers)
    elif isinstance(error, BadRequest):
        conn.send_json(400, json_error(str(error)))
    else:
        conn.send_json(error.status, json_error(str(error), error.reason), refusal_headers(error))
