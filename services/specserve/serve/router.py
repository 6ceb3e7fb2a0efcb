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
import logging
import time
from typing import Any

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
    except asyncio.TimeoutError:
        response.cancel()  # do not leave the work running on the replica
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
        self._timeout_s = timeout_s
        self._grpc_transport = grpc_transport
        self._affinity = affinity

    async def draft(self, call: DraftCall) -> DraftReply:
        # only the rows the round's rule reads: none for greedy/tas, fp16 for lossy rules, exact
        # fp32 otherwise (and when a caller did not say which rule)
        encoding = convert.row_encoding_for_rule(call.rule) if call.rule else int_pb.ROW_ENCODING_EXACT
        payload = convert.draft_call_to_proto(call, encoding).SerializeToString()
        try:
            raw = await _call(self._handle, "draft", payload, call.session_id, self._timeout_s,
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
            raw = await _call(self._handle, "draft_ahead", payload, call.session_id, self._timeout_s,
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
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._retry_backoff_s = retry_backoff_s
        self._grpc_transport = grpc_transport
        self._affinity = affinity

    async def verify(self, call: VerifyCall) -> VerifyReply:
        payload = convert.verify_call_to_proto(call).SerializeToString()
        errors = []
        for attempt in range(self._attempts):
            start = time.monotonic()
            try:
                raw = await _call(self._handle, "verify", payload, call.session_id, self._timeout_s,
                                  self._grpc_transport, self._affinity)
                return convert.verify_reply_from_proto(int_pb.VerifyReply.FromString(raw))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried below, then surfaced as UNAVAILABLE
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                logger.warning("verify attempt %d failed after %.2fs: %s", attempt + 1,
                               time.monotonic() - start, errors[-1])
                if attempt + 1 < self._attempts:
                    # give Serve's router a moment to drop a dead replica before the retry
                    await asyncio.sleep(self._retry_backoff_s)
        raise VerifierUnavailable(f"verifier unavailable after {self._attempts} attempts: {errors[-1]}")

    def end_session(self, session_id: str) -> None:
        """Free the session's KV cache on the replica that holds it (fire and forget: the LRU
        evicts it anyway if this message is lost)."""
        options: dict = {"method_name": "end_session"}
        if self._affinity and session_id:
            options["session_id"] = session_id
        self._handle.options(**options).remote(session_id)
