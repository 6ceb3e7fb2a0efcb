"""GenerationService: the public API's logic, independent of the transport.

The standalone grpc.aio server (serve/grpc_server.py) and the Ray Serve Router deployment
(serve/router.py) both call this class, so the two run the same code:

    request (proto or raw bytes) -> validate -> tokenize -> validate prompt -> engine rounds
    -> detokenize incrementally (stop sequences, partial UTF-8) -> reply / stream chunks + stats + metrics

Errors never leak a stack trace: everything leaves as `ServiceError(code, message)` with a gRPC status
code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL). Transports turn
it into their own error (`context.abort` for grpc.aio, `set_code`/`set_details` for Ray's gRPC proxy).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence

import grpc
from google.protobuf.message import DecodeError

from ..engine.types import RULES, GenerationRequest, GenerationStats, RoundResult
from ..v1 import generation_pb2 as gen_pb
from . import convert
from .metrics import ServeMetrics
from .validation import InvalidRequest, ModelInfo, RequestLimits, validate_prompt_ids, validate_request

log = logging.getLogger(__name__)


class DecodeLoop(Protocol):
    """The engine's decode loop (engine/): one RoundResult per draft/verify round."""

    def rounds(self, request: GenerationRequest) -> AsyncIterator[RoundResult]: ...


class Tokenizer(Protocol):
    """The subset of a transformers tokenizer the service uses."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class ServiceError(Exception):
    """A failure the client should see, as a gRPC status code and a message (never a stack trace)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class VerifierUnavailable(ConnectionError):
    """Raised by a verifier backend when no replica can serve the call (-> UNAVAILABLE)."""


# Exceptions meaning "the backend is gone" by class name, so this module need not import Ray.
_UNAVAILABLE_NAMES = frozenset(
    {"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError", "WorkerCrashedError"}
)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError):
        return True
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return any(cls.__name__ in _UNAVAILABLE_NAMES for cls in type(exc).__mro__)


_FINISH = {"length": gen_pb.FINISH_REASON_LENGTH, "stop": gen_pb.FINISH_REASON_STOP}


class _TextStream:
    """Incremental detokenization: decode all generated ids each round and emit the new suffix, holding
    back an incomplete UTF-8 sequence (decoded as U+FFFD) and the last len(longest stop) - 1 characters,
    which could still turn out to start a stop sequence."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._stop = list(stop)
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # text emitted so far
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _stop_at(self, text: str, start: int) -> int:
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else -1

    def add(self, new_ids: Sequence[int]) -> tuple[str, int]:
        """(text delta safe to emit now, how many of `new_ids` to keep). On a stop sequence `stopped`
        is set and only the ids up to the one that completed it are kept (a round commits several)."""
        before = len(self.ids)
        self.ids.extend(new_ids)
        full = self._decode(self.ids)
        start = max(0, len(self.text) - self._holdback)
        cut = self._stop_at(full, start)
        if cut < 0:
            stable = full.rstrip("\ufffd")
            return self._emit(stable[: len(stable) - self._holdback] if self._holdback else stable), len(new_ids)
        self.stopped = True
        keep = next(
            j for j in range(1, len(new_ids) + 1) if self._stop_at(self._decode(self.ids[: before + j]), start) >= 0
        )
        del self.ids[before + keep:]
        return self._emit(full[:cut]), keep

    def finish(self) -> str:
        """At the end of generation: whatever was held back."""
        return "" if self.stopped else self._emit(self._decode(self.ids))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta


@dataclass
class _Prepared:
    request: GenerationRequest
    stop: list[str]
    rule: str
    started: float
    client_session: bool
    stats: GenerationStats = field(default_factory=GenerationStats)


class GenerationService:
    def __init__(
        self,
        loop: DecodeLoop,
        tokenizer: Tokenizer,
        model: ModelInfo,
        *,
        limits: RequestLimits | None = None,
        metrics: ServeMetrics | None = None,
        max_concurrent_requests: int = 64,
        eos_token_ids: Sequence[int] | None = None,
    ):
        self.loop = loop
        self.tokenizer = tokenizer
        self.model = model
        self.limits = limits or RequestLimits()
        self.metrics = metrics or ServeMetrics()
        self.max_concurrent_requests = max_concurrent_requests
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._running = 0

    # ------------------------------------------------------------------ public API
    async def generate(
        self, request: gen_pb.GenerateRequest | bytes, timeout: float | None = None
    ) -> gen_pb.GenerateResponse:
        """The whole completion. `timeout` = seconds left before the client's deadline (None = none)."""
        reply = gen_pb.GenerateResponse()
        async for chunk in self.generate_stream(request, timeout):
            reply.token_ids.extend(chunk.token_ids)
            reply.text += chunk.text
            if chunk.HasField("stats"):
                reply.finish_reason = chunk.finish_reason
                reply.stats.CopyFrom(chunk.stats)
                reply.session_id = chunk.session_id
        return reply

    async def generate_stream(
        self, request: gen_pb.GenerateRequest | bytes, timeout: float | None = None
    ) -> AsyncIterator[gen_pb.GenerateStreamChunk]:
        """One chunk per round with the committed ids and the text delta; the last chunk carries the
        finish reason and the request's stats. Raises ServiceError."""
        started = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        req = self._parse(request)
        try:
            prepared = self._prepare(req, started)  # all validation happens here, before any model work
        except ServiceError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a tokenizer failure: a status, never a trace
            raise self._internal(e, req.session_id) from e
        if self._running >= self.max_concurrent_requests:
            self._count(prepared.rule, grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self._running} requests running (limit {self.max_concurrent_requests}); retry later",
            )
        self._running += 1
        self.metrics.requests_running.inc()
        status = grpc.StatusCode.OK
        try:
            async for chunk in self._run(prepared, deadline):
                yield chunk
        except ServiceError as e:
            status = e.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - the client must get a status, never a trace
            if _is_unavailable(e):
                status = grpc.StatusCode.UNAVAILABLE
                log.warning("request %s: backend unavailable: %r", prepared.request.session_id, e)
                raise ServiceError(status, "verifier unavailable; retry later") from e
            status = grpc.StatusCode.INTERNAL
            raise self._internal(e, prepared.request.session_id) from e
        finally:
            self._end_session(prepared)
            self._running -= 1
            self.metrics.requests_running.dec()
            self._count(prepared.rule, status)
            self.metrics.request_seconds.labels(prepared.rule).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _parse(request: gen_pb.GenerateRequest | bytes) -> gen_pb.GenerateRequest:
        if isinstance(request, gen_pb.GenerateRequest):
            return request
        try:
            return gen_pb.GenerateRequest.FromString(bytes(request))
        except (DecodeError, TypeError, ValueError) as e:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed GenerateRequest message ({e})"
            ) from None

    def _prepare(self, req: gen_pb.GenerateRequest, started: float) -> _Prepared:
        rule = req.rule or self.limits.default_rule
        try:
            validate_request(req, self.model, self.limits)
            prompt_ids = self._tokenize(req)
            max_new_tokens = validate_prompt_ids(req, prompt_ids, self.model, self.limits)
        except InvalidRequest as e:
            self._count(rule if rule in RULES else "unknown", grpc.StatusCode.INVALID_ARGUMENT)
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        request = convert.request_from_proto(
            req,
            prompt_ids,
            default_max_new_tokens=max_new_tokens,
            default_rule=self.limits.default_rule,
            default_draft_length=self.limits.default_draft_length,
            session_id=req.session_id or uuid.uuid4().hex,
            stop_token_ids=tuple(dict.fromkeys([*self.eos_token_ids, *req.stop_token_ids])),
        )
        self.metrics.prompt_tokens.labels(request.rule).inc(len(prompt_ids))
        return _Prepared(
            request=request, stop=list(req.stop), rule=request.rule, started=started, client_session=bool(req.session_id)
        )

    def _tokenize(self, req: gen_pb.GenerateRequest) -> list[int]:
        if req.WhichOneof("prompt") == "token_ids":
            return list(req.token_ids.ids)
        if req.chat:
            apply = getattr(self.tokenizer, "apply_chat_template", None)
            if apply is None or not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("chat", "the served model's tokenizer has no chat template")
            ids: Any = apply([{"role": "user", "content": req.text}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in self.tokenizer.encode(req.text, add_special_tokens=True)]

    async def _run(self, p: _Prepared, deadline: float | None) -> AsyncIterator[gen_pb.GenerateStreamChunk]:
        text = _TextStream(self.tokenizer, p.stop)
        finish = gen_pb.FINISH_REASON_LENGTH  # the loop ending without saying why = it ran out of tokens
        ttft = 0.0
        last = time.perf_counter()
        async with aclosing(self.loop.rounds(p.request)) as rounds:
            while True:
                try:
                    if deadline is None:
                        result = await anext(rounds)
                    else:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            result = await anext(rounds)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
                now = time.perf_counter()
                self.metrics.observe_round(p.rule, result, now - last)
                last = now
                p.stats.add_round(result)
                if result.tokens and not ttft:
                    ttft = now - p.started
                    self.metrics.time_to_first_token.labels(p.rule).observe(ttft)
                delta, keep = text.add(result.tokens)
                chunk = gen_pb.GenerateStreamChunk(
                    token_ids=result.tokens[:keep], text=delta, round=convert.round_stats_to_proto(result)
                )
                if text.stopped:
                    p.stats.generated -= len(result.tokens) - keep  # count what the client gets
                    finish = gen_pb.FINISH_REASON_STOP_SEQUENCE
                    yield chunk
                    break
                if result.finished:
                    finish = _FINISH.get(result.finish_reason, gen_pb.FINISH_REASON_LENGTH)
                    yield chunk
                    break
                yield chunk
        p.stats.seconds = time.perf_counter() - p.started
        yield gen_pb.GenerateStreamChunk(
            text=text.finish(),
            finish_reason=finish,
            stats=convert.stats_to_proto(
                p.stats, prompt_tokens=len(p.request.prompt_ids), rule=p.rule, ttft_seconds=ttft
            ),
            session_id=p.request.session_id,
        )

    @staticmethod
    def _internal(exc: BaseException, session_id: str) -> ServiceError:
        """Log the trace here, under an incident id the client can quote; send only the id."""
        incident = uuid.uuid4().hex[:12]
        log.error("request %s failed (incident %s)", session_id, incident, exc_info=exc)
        return ServiceError(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

    def _end_session(self, p: _Prepared) -> None:
        """Free the verifier's KV cache of a server-named session (a client-named one is kept for reuse;
        the verifier's LRU bounds it either way)."""
        if p.client_session:
            return
        end_session = getattr(getattr(self.loop, "verifier", None), "end_session", None)
        if end_session is not None:
            try:
                end_session(p.request.session_id)
            except Exception:  # noqa: BLE001 - best effort; the LRU evicts it anyway
                log.debug("end_session failed", exc_info=True)

    def _count(self, rule: str, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(rule, code.name).inc()
