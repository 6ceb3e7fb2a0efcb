"""The Ray Serve deployments: three drafters, the verifier, and the router (gRPC ingress).

Drafters and the verifier are thin shells around the in-process backends (engine/local.py): a
call arrives as serialized internal protobuf bytes, is decoded (serve/convert.py), served by the
local backend (which keeps per-session KV caches in a bounded LRU), and the reply goes back as
bytes. Models load in the replica constructor, never at import, so `serve build` stays cheap.

The Verifier runs each request's decode loop next to its model, over remote drafters (round_driver
"verifier", the default); the Router's gRPC service (serve/service.py) streams the rounds from it
(serve/router.py RemoteRounds). With round_driver "router" the Router runs the loop over remote
backends instead. Serve's gRPC proxy calls the Router's `Generate` / `GenerateStream` methods.

Sizing (ray_actor_options, autoscaling_config, request router) is set by serve/app.py from
AppSettings, so the decorators below carry names only.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from ray import serve

from ..v1 import internal_pb2 as int_pb
from . import convert
from .auth import APIKeys
from .settings import DEPLOYMENT_NAMES, AppSettings, ModelSettings

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- model loading (in replicas)


def _load_lm(spec: str, models: ModelSettings, drafter: bool = False):
    """A model by spec; drafters may say "MODEL@int8" / "MODEL@int4" (models/quantize.py)."""
    from ..models.causal_lm import CausalLM, pick_dtype
    from ..models.quantize import drafter_dtype, split_spec

    model, scheme = split_spec(spec) if drafter else (spec, None)
    dtype = drafter_dtype(pick_dtype(models.dtype, models.device), models.device, scheme)
    return CausalLM.load(model, dtype=dtype, device=models.device, quantize=scheme, name=spec)


def build_drafter(kind: str, models: ModelSettings):
    """The models-level Drafter behind one drafter deployment."""
    if kind == "ngram":
        if models.ngram_method == "suffix":
            from ..models.suffix import SuffixDrafter

            return SuffixDrafter(name="ngram", max_sessions=models.session_cache_size)
        from ..models.ngram import PromptLookupDrafter

        return PromptLookupDrafter(min_ngram=1, max_ngram=models.ngram_max, name="ngram")
    from ..models.drafters import EarlyExitDrafter, LMDrafter

    if kind == "small":
        # early exit of the small-drafter model: its first `small_drafter_layers` layers + lm_head
        lm = _load_lm(models.small_drafter, models, drafter=True)
        return EarlyExitDrafter(lm, models.small_drafter_layers, max_sessions=models.session_cache_size)
    if kind == "medium":
        lm = _load_lm(models.medium_drafter, models, drafter=True)
        return LMDrafter(lm, name="medium", max_sessions=models.session_cache_size)
    raise ValueError(f"unknown drafter kind {kind!r}")


def _use_torch_threads(spec) -> None:
    """Before a replica loads its model: torch threads as its DeploymentSettings say."""
    if spec.torch_threads is not None:
        from ..models.compute import set_compute_threads

        logger.info("torch intra-op threads: %d", set_compute_threads(spec.torch_threads))


def _compute_threads() -> int:
    import torch

    from ..models.compute import run_sync

    return run_sync(torch.get_num_threads)


# ---------------------------------------------------------------- workers


class _DrafterReplica:
    kind = ""

    def __init__(self, settings: dict) -> None:
        from ..engine.local import LocalDrafter

        from .autoscaling import DraftLoadMeter

        self.settings = AppSettings.model_validate(settings)
        _use_torch_threads(self.settings.deployment(self.kind))
        self.worker = LocalDrafter(build_drafter(self.kind, self.settings.models), name=self.kind)
        self.meter = DraftLoadMeter(window_s=self.settings.deployment(self.kind).autoscaling.look_back_period_s)

    async def draft(self, payload: bytes) -> bytes:
        msg = int_pb.DraftCall.FromString(payload)
        token = self.meter.start()
        try:
            reply = await self.worker.draft(convert.draft_call_from_proto(msg))
        finally:
            self.meter.finish(token, msg.verify_window_s)
        return convert.draft_reply_to_proto(reply, msg.row_encoding).SerializeToString()

    async def draft_ahead(self, payload: bytes) -> bytes:
        """Enumerate-and-select (engine/ahead.py); LM drafters only."""
        msg = int_pb.AheadCall.FromString(payload)
        if not self.worker.can_draft_ahead:
            raise TypeError(f"the {self.kind} drafter cannot draft ahead")
        token = self.meter.start()
        try:
            reply = await self.worker.draft_ahead(convert.ahead_call_from_proto(msg))
        finally:
            self.meter.finish(token)
        return convert.ahead_reply_to_proto(reply, msg.row_encoding).SerializeToString()

    def compute_threads(self) -> int:
        """torch's intra-op threads where this replica's forwards run (DeploymentSettings.torch_threads)."""
        return _compute_threads()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: what DrafterLoadPolicy scales on."""
        return self.meter.stats()


@serve.deployment(name=DEPLOYMENT_NAMES["ngram"])
class NgramDrafter(_DrafterReplica):
    """Model-free drafter (suffix trees by default, or prompt lookup): nearly free; the bottom of
    the cascade. The suffix drafter's global trie of earlier outputs lives in each replica."""

    kind = "ngram"


@serve.deployment(name=DEPLOYMENT_NAMES["small"])
class SmallDrafter(_DrafterReplica):
    """Small LM drafter (on the embedded default: an early exit of SmolLM2)."""

    kind = "small"


@serve.deployment(name=DEPLOYMENT_NAMES["medium"])
class MediumDrafter(_DrafterReplica):
    """Medium LM drafter (on the embedded default: SmolLM2 itself, a stand-in)."""

    kind = "medium"


DRAFTER_DEPLOYMENTS = {"ngram": NgramDrafter, "small": SmallDrafter, "medium": MediumDrafter}
LM_DRAFTER_KINDS = ("small", "medium")  # their replicas can draft ahead (LMDrafter.propose_ahead)


@serve.deployment(name=DEPLOYMENT_NAMES["verifier"])
class Verifier:
    """The big model: scores a whole token tree in one pass and runs acceptance next to the logits.

    With round_driver "verifier" (the default) it also runs each request's decode loop (`rounds`,
    one streaming call per request from the router), calling the drafter deployments it was bound
    to: a round costs one handle hop (to the drafters) instead of two. With "router" the router runs
    the loop and calls `verify` once a round."""

    def __init__(self, settings: dict, drafters: dict[str, Any] | None = None) -> None:
        from ..engine.local import LocalVerifier

        self.settings = s = AppSettings.model_validate(settings)
        _use_torch_threads(s.verifier)
        models = s.models
        # concurrent verify calls on this replica share one forward pass (engine/local.py:
        # continuous batching; Serve's @serve.batch needs a replica context, which local testing
        # mode and the standalone server lack, and it would add a wait timer we do not need)
        self.worker = LocalVerifier(_load_lm(models.verifier, models), max_sessions=models.session_cache_size,
                                    max_batch_size=s.verify_batch_size)
        # every session this replica runs rounds for shares self.worker, so their passes batch
        self.loop = _make_loop(s, self.worker, _remote_drafters(s, drafters)) if drafters is not None else None

    async def verify(self, payload: bytes) -> bytes:
        reply = await self.worker.verify(convert.verify_call_from_proto(int_pb.VerifyCall.FromString(payload)))
        return convert.verify_reply_to_proto(reply).SerializeToString()

    async def rounds(self, payload: bytes) -> AsyncIterator[bytes]:
        """A whole request, round by round: an internal RoundsCall in, a RoundReply per round out."""
        if self.loop is None:
            raise TypeError("this verifier was deployed with round_driver 'router': it only verifies")
        from contextlib import aclosing

        request = convert.rounds_call_from_proto(int_pb.RoundsCall.FromString(payload))
        async with aclosing(self.loop.rounds(request)) as rounds:
            async for result in rounds:
                yield convert.round_reply_to_proto(result).SerializeToString()

    def end_session(self, session_id: str) -> None:
        self.worker.end_session(session_id)

    def compute_threads(self) -> int:
        """torch's intra-op threads where this replica's forwards run (DeploymentSettings.torch_threads)."""
        return _compute_threads()


# ---------------------------------------------------------------- router (gRPC ingress)


# The OpenAI-compatible HTTP API (serve/openai_api.py), served by Serve's HTTP proxy through the
# Router. Serve builds the app on the replica (a builder, so no FastAPI object is pickled); its
# routes reach the replica's service through this module's globals (one Router replica per
# process), set in Router.__init__.
# (Router's methods call the functions below rather than touch the dict: Serve pickles the
# ingress-wrapped class by value, and a method naming the dict would carry its contents along.)
_REPLICA: dict[str, Any] = {}


def _set_replica(service, keys) -> None:
    _REPLICA.update(service=service, keys=keys)


def build_router_http_app():
    from .openai_api import build_openai_app

    return build_openai_app(lambda: _REPLICA["service"], keys=lambda: _REPLICA["keys"])


@serve.deployment(name=DEPLOYMENT_NAMES["router"])
@serve.ingress(build_router_http_app)
class Router:
    """The app's ingress. Serve's gRPC proxy calls `Generate` / `GenerateStream` with the decoded
    request message (specserve.v1.Generation; errors become gRPC status codes through
    `grpc_context`), Serve's HTTP proxy the OpenAI-compatible routes of OPENAI_APP. Both need
    `Bearer KEY` when SPECSERVE_API_KEY is set in the replica's environment (serve/auth.py)."""

    def __init__(self, verifier: Any, settings: dict, drafters: dict[str, Any] | None = None) -> None:
        from .router import RemoteRounds, RemoteVerifier

        self.settings = s = AppSettings.model_validate(settings)
        remote_verifier = RemoteVerifier(verifier, timeout_s=s.verify_timeout_s, attempts=s.verify_attempts,
                                         grpc_transport=s.grpc_transport, affinity=s.session_affinity)
        if drafters is None:  # round_driver "verifier": the verifier replica runs the rounds
            loop = RemoteRounds(remote_verifier, drafters=s.drafters)
        else:
            loop = _make_loop(s, remote_verifier, _remote_drafters(s, drafters))
        self.service = _make_service(s, loop)
        self.keys = APIKeys.load()
        _set_replica(self.service, self.keys)

    def _authorized(self, grpc_context) -> bool:
        if not self.keys:
            return True
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        return self.keys.check(metadata.get("authorization"))

    async def Generate(self, request, grpc_context=None):  # noqa: N802 - gRPC method name
        from ..v1 import generation_pb2 as gen_pb

        if not self._authorized(grpc_context):
            _set_status(grpc_context, _unauthenticated())
            return gen_pb.GenerateResponse()
        try:
            return await self.service.generate(request)
        except Exception as exc:  # noqa: BLE001 - mapped to a gRPC status below
            _set_status(grpc_context, exc)
            return gen_pb.GenerateResponse()

    async def GenerateStream(self, request, grpc_context=None) -> AsyncIterator:  # noqa: N802
        if not self._authorized(grpc_context):
            _set_status(grpc_context, _unauthenticated())
            raise RuntimeError("missing or invalid API key")
        try:
            async for chunk in self.service.generate_stream(request):
                yield chunk
        except Exception as exc:  # noqa: BLE001 - mapped to a gRPC status below
            _set_status(grpc_context, exc)
            # A stream's status travels with its chunks: ending the generator after set_code would
            # close the stream with OK (a silently truncated reply). Raising after set_code makes the
            # replica wrap the error in gRPCStatusError, which the proxy answers with our code.
            # Raise a plain RuntimeError: ServiceError(code, message) does not unpickle in the proxy.
            raise RuntimeError(str(exc)) from None


def _unauthenticated():
    import grpc

    from .service import ServiceError

    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer KEY)")


def _remote_drafters(settings: AppSettings, handles: dict[str, Any]) -> list:
    from .router import RemoteDrafter

    return [RemoteDrafter(kind, handle, timeout_s=settings.draft_timeout_s, grpc_transport=settings.grpc_transport,
                          affinity=settings.session_affinity, can_draft_ahead=kind in LM_DRAFTER_KINDS)
            for kind, handle in handles.items()]


def _make_loop(settings: AppSettings, verifier: Any, drafters: list):
    """The engine's decode loop over a verifier backend (local in a Verifier replica, remote in the
    Router) and the remote drafters, configured from the app's settings."""
    from ..engine.ahead import make_strategy
    from ..engine.loop import DecodeLoop

    options = {"units": settings.ahead_units, "max_wait_fraction": settings.ahead_max_wait,
               "miss_drafters": settings.ahead_miss_drafters} \
        if settings.ahead == "enumerate-select" else {}
    return DecodeLoop(verifier, drafters, draft_timeout_s=settings.draft_timeout_s,
                      ahead=make_strategy(settings.ahead, **options),
                      min_draft_confidence=settings.min_draft_confidence)


def _make_service(settings: AppSettings, loop: Any):
    """GenerationService over a decode loop (or the verifier's, through RemoteRounds). The router
    loads the tokenizer and config only (no weights): enough to tokenize and to validate requests."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.weights import resolve_model
    from .metrics import ServeMetrics
    from .service import GenerationService
    from .validation import ModelInfo

    path = resolve_model(settings.models.verifier)
    config = AutoConfig.from_pretrained(path)
    model = ModelInfo(
        vocab_size=config.vocab_size,
        max_context=getattr(config, "max_position_embeddings", 2048),
        drafters=tuple(settings.drafters),
        name=settings.models.verifier,
    )
    # recorded through ray.serve.metrics: Ray's metrics agent exports them with the replica tags
    return GenerationService(loop, AutoTokenizer.from_pretrained(path), model, metrics=ServeMetrics(backend="ray"))


def grpc_status_for(exc: BaseException):
    """(grpc.StatusCode, details) for an exception escaping the service. The service raises
    ServiceError(code, message) for everything it knows; the rest is a safety net."""
    import grpc

    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code, str(exc)
    if isinstance(exc, ConnectionError):  # WorkerUnavailable, service.VerifierUnavailable
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def _set_status(grpc_context, exc: BaseException) -> None:
    code, details = grpc_status_for(exc)
    if code == code.INTERNAL:
        logger.exception("request failed", exc_info=exc)
    if grpc_context is None:  # called through a DeploymentHandle: let the caller see the error
        raise exc
    grpc_context.set_code(code)
    grpc_context.set_details(details)
