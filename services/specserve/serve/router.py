"""Remote drafter / verifier backends: the engine's worker calls carried over Serve DeploymentHandles.

The router runs the same decode loop as the in-process engine; only the backends differ. Each call
is one DraftCall / VerifyCall serialized as our internal protobuf (serve/convert.py) and sent with
`handle.options(method_name=..., session_id=...)`:

* `session_id` feeds Serve's ConsistentHashRouter (configured on the worker deployments), so a
  session keeps landing on the replica that holds its KV cache. If that replica is gone the ring
  moves the session to another replica, which re-prefills from the committed ids the call carries:
  slower, never different.
* `_by_reference=False` sends the call over Serve's interdeployment gRPC transport instead of
  through the Ray object store (one less hop for small messages). Its receive limit is the env var
  RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, which serve/app.py sets for every replica.

Failure policy (DESIGN.md "Sessions, state and failure"):
* a drafter that fails or is late raises `WorkerUnavailable`; the engine drops it for the round;
* the verifier is retried (`attempts` in all, the Serve router skips a replica it saw die), then
  `WorkerUnavailable` reaches the service, which answers gRPC UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Sequence

from ..engine.types import GenerationRequest, RoundResult
from ..engine.workers import AheadCall, AheadReply, DraftCall, DraftReply, VerifyCall, VerifyReply
from ..v1 import internal_pb2 as int_pb
from . import convert
from .service import VerifierUnavailable

logger = logging.getLogger(__name__)


class WorkerUnavailable(ConnectionError):
    """A drafter deployment could not answer (dead replica, timeout, no replica).
    The verifier raises service.VerifierUnavailable (also a ConnectionError -> gRPC UNAVAILABLE)."""


async def _call(handle: Any, method: str, payload: bytes, session_id: str, timeout_s: float,
                grpc_transport: bool, affinity: bool) -> bytes:
    options: dict = {"method_name": method}
    if affinity and session_id:
        options["session_id"] = session_id
    if grpc_transport:
        options["_by_reference"] = False
    response = handle.options(**options).remote(payload)
    try:
        return await asyncio.wait_for(_result(response), timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        # do not leave the work running on the replica: Serve does not cancel a unary call whose
        # awaiting task is cancelled (a build that missed would run on, ahead of the next draft)
        response.cancel()
        raise


async def _result(response: Any) -> bytes:
    return await response


class RemoteDrafter:
    """DrafterBackend over a drafter deployment handle."""

    def __init__(self, name: str, handle: Any, *, timeout_s: float, grpc_transport: bool = True,
                 affinity: bool = True, can_draft_ahead: bool = False) -> None:
        self.name = name
        self.can_draft_ahead = can_draft_ahead  # an LM drafter deployment (engine/ahead.py)
        self.model_free = not can_draft_ahead  # the n-gram deployment: its drafts cost ~nothing
        self._handle = handle
        self.timeout_s = timeout_s
        self._grpc_transport = grpc_transport
        self._affinity = affinity

    async def draft(self, call: DraftCall) -> DraftReply:
        # only the rows the round's rule reads: none for greedy/tas, fp16 for lossy rules, exact
        # fp32 otherwise (and when a caller did not say which rule)
        encoding = convert.row_encoding_for_rule(call.rule) if call.rule else int_pb.ROW_ENCODING_EXACT
        payload = convert.draft_call_to_proto(call, encoding).SerializeToString()
        try:
            raw = await _call(self._handle, "draft", payload, call.session_id, self.timeout_s,
                              self._grpc_transport, self._affinity)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure drops this drafter for the round
            raise WorkerUnavailable(f"drafter {self.name!r} failed: {type(exc).__name__}: {exc}") from exc
        return convert.draft_reply_from_proto(int_pb.DraftReply.FromString(raw))

    async def draft_ahead(self, call: AheadCall) -> AheadReply:
        encoding = convert.row_encoding_for_rule(call.rule) if call.rule else int_pb.ROW_ENCODING_EXACT
        payload = convert.ahead_call_to_proto(call, encoding).SerializeToString()
        try:
            raw = await _call(self._handle, "draft_ahead", payload, call.session_id, self.timeout_s,
                              self._grpc_transport, self._affinity)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed build only costs speed
            raise WorkerUnavailable(f"drafter {self.name!r} failed to draft ahead: {type(exc).__name__}: {exc}") from exc
        return convert.ahead_reply_from_proto(int_pb.AheadReply.FromString(raw))


class RemoteVerifier:
    """VerifierBackend over the verifier deployment handle, with a bounded retry."""

    name = "verifier"

    def __init__(self, handle: Any, *, timeout_s: float, attempts: int = 2,
                 grpc_transport: bool = True, affinity: bool = True, retry_backoff_s: float = 1.0) -> None:
        self._handle = handle
        self.timeout_s = timeout_s  # per call; per streamed round for stream_rounds
        self.attempts = attempts
        self.retry_backoff_s = retry_backoff_s
        self._grpc_transport = grpc_transport
        self._affinity = affinity

    async def verify(self, call: VerifyCall) -> VerifyReply:
        payload = convert.verify_call_to_proto(call).SerializeToString()
        errors = []
        for attempt in range(self.attempts):
            start = time.monotonic()
            try:
                raw = await _call(self._handle, "verify", payload, call.session_id, self.timeout_s,
                                  self._grpc_transport, self._affinity)
                return convert.verify_reply_from_proto(int_pb.VerifyReply.FromString(raw))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried below, then surfaced as UNAVAILABLE
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                logger.warning("verify attempt %d failed after %.2fs: %s", attempt + 1,
                               time.monotonic() - start, errors[-1])
                if attempt + 1 < self.attempts:
                    # give Serve's router a moment to drop a dead replica before the retry
                    await asyncio.sleep(self.retry_backoff_s)
        raise VerifierUnavailable(f"verifier unavailable after {self.attempts} attempts: {errors[-1]}")

    def stream_rounds(self, request: GenerationRequest) -> Any:
        """One `Verifier.rounds` streaming call (round_driver "verifier"): a DeploymentResponseGenerator
        of serialized RoundReply messages (the request goes as a RoundsCall, internal.proto)."""
        options: dict = {"method_name": "rounds", "stream": True}
        if self._affinity and request.session_id:
            options["session_id"] = request.session_id
        if self._grpc_transport:
            options["_by_reference"] = False
        return self._handle.options(**options).remote(convert.rounds_call_to_proto(request).SerializeToString())

    def end_session(self, session_id: str) -> None:
        """Free the session's KV cache on the replica that holds it (fire and forget: the LRU
        evicts it anyway if this message is lost)."""
        options: dict = {"method_name": "end_session"}
        if self._affinity and session_id:
            options["session_id"] = session_id
        self._handle.options(**options).remote(session_id)


class RemoteRounds:
    """A verifier replica's decode loop, as the service sees a loop (round_driver "verifier").

    `rounds(request)` streams the RoundResults of one `Verifier.rounds` call, each within the
    verify timeout. A stream that breaks (the replica died, a timeout) resumes on a replica the
    router reaches next, from the prompt plus every token already streamed, for what is left of
    max_new_tokens: greedy output is the same, sampled output stays a sample of the verifier's law
    (the resumed part draws from another seed, so it reuses none of the random numbers already
    spent). After `attempts` broken streams the request fails with VerifierUnavailable."""

    def __init__(self, verifier: RemoteVerifier, drafters: Sequence[str]) -> None:
        self.verifier = verifier  # the service frees server-named sessions through it
        self.drafters = tuple(drafters)

    async def rounds(self, request: GenerationRequest) -> AsyncIterator[RoundResult]:
        streamed: list[int] = []
        errors: list[str] = []
        for attempt in range(self.verifier.attempts):
            current = request if attempt == 0 else _resumed(request, streamed, attempt)
            if current.max_new_tokens < 1:
                return
            stream = self.verifier.stream_rounds(current)
            done = False
            try:
                while True:
                    try:
                        async with asyncio.timeout(self.verifier.timeout_s):
                            result = convert.round_reply_from_proto(int_pb.RoundReply.FromString(await anext(stream)))
                    except StopAsyncIteration:
                        done = True
                        return
                    except (ValueError, TypeError):
                        done = True  # the request itself is wrong: no replica will take it
                        raise
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a broken stream resumes below
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                        logger.warning("rounds stream of %s broke after %d tokens (attempt %d): %s",
                                       request.session_id, len(streamed), attempt + 1, errors[-1])
                        break
                    streamed.extend(result.tokens)
                    yield result
                    if result.finished:
                        done = True
                        return
            finally:
                if not done:
                    stream.cancel()  # a consumer that left, or a broken call: stop the replica's loop
            if attempt + 1 < self.verifier.attempts:
                await asyncio.sleep(self.verifier.retry_backoff_s)
        raise VerifierUnavailable(f"verifier unavailable after {self.verifier.attempts} attempts: {errors[-1]}")


def _resumed(request: GenerationRequest, streamed: list[int], attempt: int) -> GenerationRequest:
    """What is left of `request` once `streamed` tokens reached the client."""
    seed = None if request.seed is None else (request.seed + attempt * 0x9E3779B97F4A7C15) % (1 << 63)
    return dataclasses.replace(request, prompt_ids=list(request.prompt_ids) + list(streamed),
                               max_new_tokens=request.max_new_tokens - len(streamed), seed=seed)
