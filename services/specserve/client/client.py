"""Sync and async clients. Both build the same GenerateRequest (`build_request`) and raise
SpecServeError (carrying the gRPC status code and the server's message) on failure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc

from ..v1 import generation_pb2 as gen_pb
from ..v1 import generation_pb2_grpc as gen_grpc

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class SpecServeError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def build_request(
    prompt: str | Sequence[int],
    *,
    chat: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    rule: str = "",
    delta: float | None = None,
    tas_epsilon: float | None = None,
    tas_alpha: float | None = None,
    drafters: Sequence[str] = (),
    draft_length: int | None = None,
    tree: Sequence[int] = (),
    max_new_tokens: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    session_id: str = "",
) -> gen_pb.GenerateRequest:
    """A GenerateRequest; options left as None use the server's defaults. `prompt` is text or token ids."""
    req = gen_pb.GenerateRequest(
        chat=chat,
        rule=rule,
        drafters=list(drafters),
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        session_id=session_id,
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    for msg, name, value in (
        (req.sampling, "temperature", temperature),
        (req.sampling, "top_k", top_k),
        (req.sampling, "top_p", top_p),
        (req.rule_params, "delta", delta),
        (req.rule_params, "tas_epsilon", tas_epsilon),
        (req.rule_params, "tas_alpha", tas_alpha),
        (req, "draft_length", draft_length),
        (req, "max_new_tokens", max_new_tokens),
        (req, "seed", seed),
    ):
        if value is not None:
            setattr(msg, name, value)
    req.tree.branching.extend(tree)
    return req


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _error(e: grpc.RpcError) -> SpecServeError:
    return SpecServeError(e.code(), e.details() or "")


def _credentials(tls: bool, tls_ca: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (a CA bundle file, else the system roots) or None for plaintext."""
    if not tls and tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes() if tls_ca else None)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class SpecServeClient:
    """Blocking client. `timeout` (seconds) becomes the gRPC deadline of each call. `api_key` is
    sent as `authorization: Bearer KEY`; `tls_ca` (a PEM file) or `tls=True` (system roots) turn
    on TLS."""

    def __init__(self, target: str, timeout: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 api_key: str | None = None, tls: bool = False, tls_ca: str | None = None):
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        credentials = _credentials(tls, tls_ca)
        options = _channel_options(max_message_bytes)
        self._channel = (grpc.secure_channel(target, credentials, options=options) if credentials
                         else grpc.insecure_channel(target, options=options))
        self._stub = gen_grpc.GenerationStub(self._channel)

    def generate(self, prompt: str | Sequence[int] | gen_pb.GenerateRequest, timeout: float | None = None, **options) -> gen_pb.GenerateResponse:
        req = prompt if isinstance(prompt, gen_pb.GenerateRequest) else build_request(prompt, **options)
        try:
            return self._stub.Generate(req, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def generate_stream(self, prompt: str | Sequence[int] | gen_pb.GenerateRequest, timeout: float | None = None, **options) -> Iterator[gen_pb.GenerateStreamChunk]:
        req = prompt if isinstance(prompt, gen_pb.GenerateRequest) else build_request(prompt, **options)
        call = self._stub.GenerateStream(req, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()  # no-op when finished; frees the server when the caller stops early

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SpecServeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSpecServeClient:
    """asyncio client (grpc.aio). Create it inside a running event loop. Options as SpecServeClient."""

    def __init__(self, target: str, timeout: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 api_key: str | None = None, tls: bool = False, tls_ca: str | None = None):
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        credentials = _credentials(tls, tls_ca)
        options = _channel_options(max_message_bytes)
        self._channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                         else grpc.aio.insecure_channel(target, options=options))
        self._stub = gen_grpc.GenerationStub(self._channel)

    async def generate(self, prompt: str | Sequence[int] | gen_pb.GenerateRequest, timeout: float | None = None, **options) -> gen_pb.GenerateResponse:
        req = prompt if isinstance(prompt, gen_pb.GenerateRequest) else build_request(prompt, **options)
        try:
            return await self._stub.Generate(req, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def generate_stream(self, prompt: str | Sequence[int] | gen_pb.GenerateRequest, timeout: float | None = None, **options) -> AsyncIterator[gen_pb.GenerateStreamChunk]:
        req = prompt if isinstance(prompt, gen_pb.GenerateRequest) else build_request(prompt, **options)
        call = self._stub.GenerateStream(req, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncSpecServeClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
