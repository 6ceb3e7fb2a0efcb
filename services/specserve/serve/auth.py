"""API keys for the public ports: `Authorization: Bearer KEY` on HTTP, gRPC metadata
`authorization: Bearer KEY`.

Keys come from `--api-key-file FILE` (one per line, blank lines and `#` comments ignored) and/or
the env var SPECSERVE_API_KEY (comma-separated). A missing or wrong key is refused before any
parsing or model work (HTTP 401, gRPC UNAUTHENTICATED). Keys are compared with
`hmac.compare_digest` against every configured key (no early exit), so the time taken says
nothing about how much of a key matched. Health checks, reflection, /metrics and the readiness
probe stay open: they reveal nothing and orchestrators call them without credentials.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

ENV_VAR = "SPECSERVE_API_KEY"
# gRPC methods anyone may call (prefixes of the full method name)
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/ray.serve.RayServeAPIService/")


class APIKeys:
    """The configured keys; empty = authentication off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(k.strip() for k in keys) if k]

    @classmethod
    def load(cls, key_file: str | None = None, env: dict | None = None) -> "APIKeys":
        env = os.environ if env is None else env
        keys: list[str] = []
        if key_file:
            path = Path(key_file)
            if not path.is_file():
                raise ValueError(f"--api-key-file: {key_file!r} does not exist")
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
            if not keys:
                raise ValueError(f"--api-key-file: {key_file!r} holds no key")
        keys += [k for k in env.get(ENV_VAR, "").split(",") if k.strip()]
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> bool:
        """True for a header value `Bearer KEY` with a configured KEY (always True when no key is
        configured)."""
        if not self._keys:
            return True
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        candidate = presented.strip().encode()
        ok = False
        for key in self._keys:  # every key, always: constant time in which key (if any) matched
            ok |= hmac.compare_digest(candidate, key)
        return ok


def is_loopback(address: str) -> bool:
    """True for loopback addresses; "" and 0.0.0.0 mean every interface."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(keys: APIKeys, addresses: Sequence[str], allow_open: bool) -> str | None:
    """Refuse (ValueError) to serve without keys on a non-loopback address unless `allow_open`;
    returns the warning to log when the server is open to anyone who can reach it."""
    exposed = [a for a in addresses if not is_loopback(a)]
    if keys:
        return None
    if exposed and not allow_open:
        raise ValueError(
            f"refusing to listen on {', '.join(exposed)} without an API key: give --api-key-file or "
            f"{ENV_VAR}, bind 127.0.0.1, or pass --allow-unauthenticated"
        )
    return f"no API key configured: the API on {', '.join(addresses)} is open to anyone who can reach it"


class GrpcKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid `authorization: Bearer KEY` metadata entry, except the
    open services (health, reflection), with UNAUTHENTICATED, before the handler runs."""

    def __init__(self, keys: APIKeys) -> None:
        self.keys = keys

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer KEY)")

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer KEY)")
            yield  # pragma: no cover - makes this an async generator

        # requests are not deserialized: the refusal happens before any parsing
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not self.keys or method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.keys.check(metadata.get("authorization")):
            return await continuation(handler_call_details)
        return self._deny_stream if method.endswith("Stream") else self._deny_unary
