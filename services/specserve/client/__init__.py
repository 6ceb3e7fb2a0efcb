"""Python client for the specserve gRPC API (standalone server or Ray Serve's gRPC proxy).

    from specserve.client import SpecServeClient
    with SpecServeClient("127.0.0.1:50051") as client:
        reply = client.generate("Write a haiku", max_new_tokens=32, temperature=0.7, seed=1)
        for chunk in client.generate_stream("Write a haiku"):
            print(chunk.text, end="")
"""

from .client import AsyncSpecServeClient, SpecServeClient, SpecServeError, build_request

__all__ = ["AsyncSpecServeClient", "SpecServeClient", "SpecServeError", "build_request"]
