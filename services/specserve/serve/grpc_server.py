"""Standalone grpc.aio server: the same GenerationService as the Ray Router, in one process, no Ray.

    specserve serve --standalone --port 50051 [--metrics-port 9400]

Serves `specserve.v1.Generation`, standard `grpc.health.v1.Health` and server reflection, exposes
Prometheus metrics over HTTP, sets explicit message-size limits and shuts down gracefully (health goes
NOT_SERVING, new RPCs are refused, running ones get `grace_seconds` to finish).

Requests are deserialized inside the service rather than by grpc, so a malformed message becomes
INVALID_ARGUMENT naming the request, instead of grpc's generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, Field

from ..v1 import generation_pb2 as gen_pb
from ..engine.types import DEFAULT_MIN_DRAFT_CONFIDENCE
from .auth import APIKeys, GrpcKeyInterceptor, check_exposure
from .metrics import ServeMetrics
from .service import GenerationService, ServiceError
from .validation import ModelInfo, RequestLimits

log = logging.getLogger(__name__)

SERVICE_NAME = gen_pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "specserve.v1.Generation"


class ModelsConfig(BaseModel):
    verifier: str = "smollm2-135m"  # alias (models/weights.py), local directory or hub id
    # drafter specs: "ngram" (Max-Gram), "prompt-lookup", "suffix", "early-exit:N" (the verifier's first N layers),
    # or another causal LM sharing the verifier's tokenizer
    drafters: list[str] = Field(default_factory=lambda: ["ngram", "suffix", "prompt-lookup"])
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # LM drafters end a chain after a token they gave less than this (lossless: lengths only)
    min_draft_confidence: float = Field(DEFAULT_MIN_DRAFT_CONFIDENCE, ge=0, lt=1)
    max_sessions: int = Field(64, ge=1)
    draft_timeout_s: float | None = Field(None, gt=0)
    # concurrent requests' verification passes merged into one forward (1 = never batch)
    max_verify_batch: int = Field(8, ge=1)


class ServerConfig(BaseModel):
    address: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 = any free port
    metrics_port: int | None = Field(None, ge=0, le=65535)  # None = no HTTP metrics endpoint
    # OpenAI-compatible HTTP API (serve/openai_api.py) on the same service and decode loop; None = off
    http_port: int | None = Field(None, ge=0, le=65535)
    # API keys (serve/auth.py): a file with one key per line, plus env SPECSERVE_API_KEY
    api_key_file: str | None = None
    # without a key the server listens on loopback addresses only, unless this says otherwise
    allow_unauthenticated: bool = False
    # TLS for gRPC and HTTPS (PEM files); both or neither
    tls_cert: str | None = None
    tls_key: str | None = None
    # Public messages are small (a prompt, some ids); anything near these limits is a mistake.
    max_receive_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_send_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_concurrent_requests: int = Field(64, ge=1)
    grace_seconds: float = Field(5.0, ge=0)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    models: ModelsConfig = Field(default_factory=ModelsConfig)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining


def generation_handler(service: GenerationService) -> grpc.GenericRpcHandler:
    """The Generation service's RPC handlers over `service` (requests arrive as raw bytes)."""

    # GenerationService raises only ServiceError; the last resort keeps grpc from putting an unexpected
    # exception's text into the status details.
    async def generate(request: bytes, context: grpc.aio.ServicerContext) -> gen_pb.GenerateResponse:
        try:
            return await service.generate(request, timeout=_deadline(context))
        except ServiceError as e:
            await context.abort(e.code, e.message)
        except Exception:  # noqa: BLE001
            log.exception("Generate failed outside the service")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    async def generate_stream(request: bytes, context: grpc.aio.ServicerContext):
        try:
            async for chunk in service.generate_stream(request, timeout=_deadline(context)):
                yield chunk
        except ServiceError as e:
            await context.abort(e.code, e.message)
        except Exception:  # noqa: BLE001
            log.exception("GenerateStream failed outside the service")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.unary_unary_rpc_method_handler(
                generate, response_serializer=gen_pb.GenerateResponse.SerializeToString
            ),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                generate_stream, response_serializer=gen_pb.GenerateStreamChunk.SerializeToString
            ),
        },
    )


class StandaloneServer:
    """grpc.aio server around one GenerationService. `await start()` returns the bound port."""

    def __init__(self, service: GenerationService, config: ServerConfig | None = None, keys: APIKeys | None = None):
        self.service = service
        self.config = config or ServerConfig()
        c = self.config
        if (c.tls_cert is None) != (c.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        self.keys = keys if keys is not None else APIKeys.load(c.api_key_file)
        # refuses a non-loopback address without keys (unless allowed); says so when open
        self.open_warning = check_exposure(self.keys, [c.address], c.allow_unauthenticated)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._http: "uvicorn.Server | None" = None
        self._http_task: asyncio.Task | None = None

    async def start(self) -> int:
        c = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", c.max_receive_message_bytes),
                ("grpc.max_send_message_length", c.max_send_message_bytes),
            ],
            interceptors=[GrpcKeyInterceptor(self.keys)] if self.keys else None,
        )
        server.add_generic_rpc_handlers((generation_handler(self.service),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if c.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())]
            )
            self.port = server.add_secure_port(f"{c.address}:{c.port}", credentials)
        else:
            self.port = server.add_insecure_port(f"{c.address}:{c.port}")
        if not self.port:
            raise OSError(f"cannot bind {c.address}:{c.port}")
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port is not None:
            self._metrics_http = self.service.metrics.serve_http(c.metrics_port, c.address)
        if c.http_port is not None:
            await self._start_http()
        if self.open_warning:
            log.warning(self.open_warning)
        log.info("specserve gRPC on %s:%d%s (HTTP port %s, metrics port %s)", c.address, self.port,
                 " with TLS" if c.tls_cert else "", self.http_port, c.metrics_port)
        return self.port

    async def _start_http(self) -> None:
        """The OpenAI-compatible API in this process's event loop: the same service, one decode loop."""
        import socket

        import uvicorn

        from .openai_api import build_openai_app

        c = self.config
        app = build_openai_app(lambda: self.service, keys=self.keys)
        sock = socket.socket(socket.AF_INET6 if ":" in c.address else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((c.address, c.http_port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", ssl_certfile=c.tls_cert, ssl_keyfile=c.tls_key,
                                timeout_graceful_shutdown=int(c.grace_seconds) or None, lifespan="off")
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:  # bound already; wait until it accepts
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING first (load balancers stop sending), then drain."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        if self._http is not None:
            self._http.should_exit = True
            await self._http_task
            self._http = self._http_task = None
        await self._server.stop(self.config.grace_seconds if grace is None else grace)
        self._server = None
        if self._metrics_http is not None:
            http_server, thread = self._metrics_http
            http_server.shutdown()
            thread.join(timeout=5)
            self._metrics_http = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


# ---------------------------------------------------------------- building from config


def build_local_service(config: ServerConfig, metrics: ServeMetrics | None = None) -> GenerationService:
    """Load the verifier and drafters named in `config.models` into in-process backends."""
    from ..engine.factory import make_local_drafters
    from ..engine.local import LocalVerifier
    from ..engine.loop import DecodeLoop
    from ..models.causal_lm import CausalLM

    m = config.models
    lm = CausalLM.load(m.verifier, dtype=m.dtype)
    drafters = make_local_drafters(m.drafters, lm)  # the same drafter specs as `specserve generate`
    verifier = LocalVerifier(lm, max_sessions=m.max_sessions, max_batch_size=m.max_verify_batch)
    loop = DecodeLoop(verifier, drafters, draft_timeout_s=m.draft_timeout_s, min_draft_confidence=m.min_draft_confidence)
    return GenerationService(
        loop,
        lm.tokenizer,
        model_info_for(lm, tuple(m.drafters)),
        limits=config.limits,
        metrics=metrics,
        max_concurrent_requests=config.max_concurrent_requests,
    )


def model_info_for(lm, drafters: tuple[str, ...]) -> ModelInfo:
    """Vocabulary = rows of the input embedding (ids beyond it would crash the forward);
    context = the model's position limit."""
    cfg = lm.model.config
    max_context = getattr(cfg, "max_position_embeddings", None) or 2048
    return ModelInfo(
        vocab_size=int(lm.model.get_input_embeddings().num_embeddings),
        max_context=int(max_context),
        drafters=drafters,
        name=getattr(lm, "name", ""),
    )


async def serve_standalone(config: ServerConfig, service: GenerationService | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    service = service or build_local_service(config)
    server = StandaloneServer(service, config)
    port = await server.start()
    print(f"specserve: serving specserve.v1.Generation on {config.address}:{port}", flush=True)
    if server.http_port is not None:
        scheme = "https" if config.tls_cert else "http"
        print(f"specserve: OpenAI-compatible API on {scheme}://{config.address}:{server.http_port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("specserve: shutting down", flush=True)
    await server.stop()
