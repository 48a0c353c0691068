"""What both doors (gRPC and HTTP) decide the same way: who may call, what a chat message's role
means, which status a failure gets, and shutdown's accounting. One place, so the doors cannot drift
apart."""

from __future__ import annotations

import hmac

import grpc

from expertmesh.router.requests import InvalidRequest
from expertmesh.router.serving import EngineUnavailable, QueueFull

# a failure of the request -> (gRPC status, HTTP status); UNAVAILABLE and 503 are retryable
STATUS = {
    InvalidRequest: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    EngineUnavailable: (grpc.StatusCode.UNAVAILABLE, 503),
}


def bearer_matches(header: str | None, token: bytes) -> bool:
    """`authorization: Bearer TOKEN`, the scheme in any case (RFC 9110), the token compared in
    constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def chat_role(role: str) -> str:
    """A message's role as the chat template knows it: OpenAI's `developer` is the system message."""
    return "system" if role == "developer" else role


SHUTTING_DOWN = "the server is shutting down; retry elsewhere"


class Drain:
    """Generations in flight on both doors, and whether new ones are still taken. Both doors run on
    the gateway's one event loop: only that loop's thread touches it."""

    def __init__(self):
        self.draining = False  # shutting down: streams in flight finish, new ones are refused (retryable)
        self.in_flight = 0  # generations not yet ended, gRPC and HTTP

    def enter(self) -> bool:
        """A generation starts: False (refuse it, UNAVAILABLE / 503) once draining."""
        if self.draining:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
