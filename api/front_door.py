"""What both doors (gRPC and HTTP) decide the same way: who may call, what a chat message's role
means, which status a failure gets. One place, so the doors cannot drift apart."""

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
