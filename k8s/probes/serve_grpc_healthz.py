"""Readiness probe for a Ray Serve node: is this node's Serve gRPC proxy ready for traffic?

Kubernetes' built-in `grpc:` probe speaks only grpc.health.v1, which Ray Serve's gRPC proxy does not
serve. The proxy's own health RPC is `/ray.serve.RayServeAPIService/Healthz` (Ray 2.60): it answers
OK with "success" when the proxy is up, not draining, and has its route table, and UNAVAILABLE with
the reason otherwise. This script calls it with raw bytes (the request message is empty), so it needs
only grpcio, not the ray import (seconds of start-up on every probe).

Exit status 0 = ready, 1 = not ready (the reason goes to stdout, which kubelet records in events).
The image installs it at /opt/specserve/probes/serve_grpc_healthz.py (see ../../Dockerfile).
"""

from __future__ import annotations

import argparse
import sys

import grpc

HEALTHZ_METHOD = "/ray.serve.RayServeAPIService/Healthz"
EMPTY_HEALTHZ_REQUEST = b""  # HealthzRequest has no fields: its wire form is empty


def check(address: str, timeout_s: float) -> tuple[bool, str]:
    """One Healthz call. Returns (ready, reason)."""
    with grpc.insecure_channel(address) as channel:
        healthz = channel.unary_unary(HEALTHZ_METHOD)  # no (de)serializers: bytes in, bytes out
        try:
            healthz(EMPTY_HEALTHZ_REQUEST, timeout=timeout_s)
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    return True, "success"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=9000, help="Serve grpc_options.port")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    ready, reason = check(f"{args.host}:{args.port}", args.timeout)
    print(reason)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
