"""Settings of the distributed app: which models, which drafters, and how each deployment is sized.

`build_app(args)` (serve/app.py) validates its args into `AppSettings`, so a Serve config file or
`serve run specserve.serve.app:build_app key=value` can override any field. Two profiles give the
defaults: `cpu` (this machine: fractional CPUs, fp32) and `gpu` (one GPU per model replica, bf16).

Every deployment has its own `DeploymentSettings`: drafters and the verifier scale independently,
each on its own ongoing-request count (see serve/autoscaling.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.types import DEFAULT_MIN_DRAFT_CONFIDENCE

DrafterKind = Literal["ngram", "small", "medium"]
DRAFTER_KINDS: tuple[DrafterKind, ...] = ("ngram", "small", "medium")

# Names of the Serve deployments (also the drafter names the engine and the metrics see).
DEPLOYMENT_NAMES = {
    "ngram": "NgramDrafter",
    "small": "SmallDrafter",
    "medium": "MediumDrafter",
    "verifier": "Verifier",
    "router": "Router",
}

EMBEDDED_MODEL = "smollm2-135m"  # models/weights.py alias of the embedded default


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Strict):
    """Ray Serve's autoscaling_config (replica-queue-length policy), with our defaults."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # ongoing requests per replica the autoscaler aims for (a drafter call is short: a few per replica)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    # how often handles/replicas push load metrics; None = Serve's default (10 s). Serve marks this
    # field deprecated in favour of env vars but 2.60 still honours it, and tests need it short.
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float = Field(10.0, gt=0)
    # what it scales on (serve/autoscaling.py): Serve's ongoing-request count, or, for drafters,
    # their measured drafting load (busy time + queue, drafts that do not fit under verification)
    policy: Literal["ongoing-requests", "drafting-load"] = "ongoing-requests"
    target_utilization: float = Field(0.6, gt=0, le=1)  # drafting-load: busy fraction aimed for
    max_draft_over_verify: float = Field(1.0, gt=0)  # drafting-load: draft time / verify time allowed

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class DeploymentSettings(_Strict):
    num_cpus: float = Field(0.1, ge=0)  # fractional on a small CPU box, so every replica fits
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # e.g. {"drafter_node": 0.01}
    max_ongoing_requests: int = Field(8, ge=1)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    # torch's intra-op threads in the replica. Ray starts every replica with OMP_NUM_THREADS =
    # its whole num_cpus (1 for a fractional replica), so a CPU model replica would compute on one
    # core of a node whose every core is idle while it runs. 0 = every CPU the replica may run on;
    # None = leave Ray's setting. Rounds are synchronous, so the verifier and an LM drafter on one
    # node take turns at the cores; with drafting ahead (they overlap) give each its own share.
    torch_threads: int | None = Field(None, ge=0)

    def ray_actor_options(self) -> dict:
        options: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


def _drafter_defaults() -> DeploymentSettings:
    # Drafters are cheap and their load follows the request rate: let them scale out.
    return DeploymentSettings(
        max_ongoing_requests=16,
        torch_threads=0,
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=4,
                                        policy="drafting-load"),
    )


def _verifier_defaults() -> DeploymentSettings:
    # With round_driver "verifier" every running request holds one of these for its whole length:
    # room for two passes' worth of sessions (verify_batch_size 8) before the router queues one.
    return DeploymentSettings(
        max_ongoing_requests=16,
        torch_threads=0,
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=2, target_ongoing_requests=4),
    )


def _router_defaults() -> DeploymentSettings:
    # The router mostly awaits other deployments: many concurrent streams per replica.
    return DeploymentSettings(
        max_ongoing_requests=64,
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=2, target_ongoing_requests=32),
    )


_ROLE_DEFAULTS = {
    "ngram": _drafter_defaults,
    "small": _drafter_defaults,
    "medium": _drafter_defaults,
    "verifier": _verifier_defaults,
    "router": _router_defaults,
}
# GPU fraction per replica on the gpu profile: LM drafters share a GPU, the verifier owns one.
_GPU_SHARE = {"ngram": 0.0, "small": 0.25, "medium": 0.5, "verifier": 1.0, "router": 0.0}


def deep_merge(base: dict, override: dict) -> dict:
    """`override` over `base`, nested dicts merged key by key (settings overrides, bench variants)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ModelSettings(_Strict):
    verifier: str = EMBEDDED_MODEL  # alias (models/weights.py), local directory or hub id
    # drafter models take the CLI's spec syntax: "MODEL@int8" / "MODEL@int4" quantizes the drafter's
    # weights (models/quantize.py, CPU only); the verifier is never quantized
    medium_drafter: str = EMBEDDED_MODEL  # stand-in on the embedded default: SmolLM2 drafting for itself
    small_drafter: str = EMBEDDED_MODEL  # the small drafter is an early exit of this model
    small_drafter_layers: int = Field(4, ge=1)  # early-exit depth of the small drafter
    # the n-gram deployment's drafter: "suffix" (SuffixDecoding: per-request + a per-replica global
    # suffix trie over earlier outputs, models/suffix.py) or "prompt-lookup" (n-gram copy)
    ngram_method: Literal["suffix", "prompt-lookup"] = "suffix"
    ngram_max: int = Field(4, ge=1)  # longest n-gram prompt lookup matches
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    session_cache_size: int = Field(32, ge=1)  # per-replica LRU of session KV caches


class AppSettings(_Strict):
    profile: Literal["cpu", "gpu"] = "cpu"
    name: str = "specserve"
    models: ModelSettings = Field(default_factory=ModelSettings)
    drafters: tuple[DrafterKind, ...] = ("ngram", "small")
    ngram: DeploymentSettings = Field(default_factory=_drafter_defaults)
    small: DeploymentSettings = Field(default_factory=_drafter_defaults)
    medium: DeploymentSettings = Field(default_factory=_drafter_defaults)
    verifier: DeploymentSettings = Field(default_factory=_verifier_defaults)
    router: DeploymentSettings = Field(default_factory=_router_defaults)
    # Who runs the decode loop. "verifier": each request is one streaming call from the router to a
    # verifier replica, which runs the rounds next to its model and calls the drafter deployments
    # (one handle hop a round). "router": the router runs the loop and calls drafters and then the
    # verifier every round (two hops). Drafters are their own deployments either way.
    round_driver: Literal["verifier", "router"] = "verifier"
    # Router -> worker calls
    draft_timeout_s: float = Field(10.0, gt=0)  # a late drafter is dropped for the round
    verify_timeout_s: float = Field(120.0, gt=0)  # per round (round_driver verifier: per streamed round)
    # first try + one retry on another replica (round_driver verifier: a broken stream resumes from
    # the tokens already streamed)
    verify_attempts: int = Field(2, ge=1)
    session_affinity: bool = True  # consistent-hash the session id onto worker replicas
    grpc_transport: bool = True  # Serve's interdeployment gRPC instead of Ray object refs
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=4 * 1024 * 1024)
    # cross-request batching on each Verifier replica: up to this many concurrent verify calls
    # share one forward pass (1 = never batch). Calls that arrive while a pass runs form the next
    # one, so a lone request never waits. More than the verifier's max_ongoing_requests never fills.
    verify_batch_size: int = Field(8, ge=1)
    # draft the next round while the verifier checks this one (engine/ahead.py): "none",
    # "full-acceptance" (bet on full acceptance) or "enumerate-select" (draft for every likely
    # outcome; needs an LM drafter: small or medium). None = full-acceptance on the gpu profile
    # (drafters on their own nodes), none on cpu (they would share the cores).
    drafting_ahead: Literal["none", "full-acceptance", "enumerate-select"] | None = None
    overlap_drafting: bool | None = None  # the old switch: True = "full-acceptance"
    # enumerate-select: how long a build still running when the verify reply is in may take, as a
    # fraction of that verification's time, before the round drafts without it
    ahead_max_wait: float = Field(0.25, ge=0)
    ahead_units: int = Field(8, ge=1)  # enumerate-select: branches built per round
    # enumerate-select: who drafts a round no build answered: "all" (the LM too, synchronously)
    # or "instant" (the n-gram deployment only: the verifier never waits for an LM drafter)
    ahead_miss_drafters: Literal["all", "instant"] = "all"
    # the router asks LM drafters to end a chain after a token they gave less than this
    # (DraftCall.min_confidence; lengths only, so lossless; 0 = off)
    min_draft_confidence: float = Field(DEFAULT_MIN_DRAFT_CONFIDENCE, ge=0, lt=1)

    @property
    def ahead(self) -> str | None:
        """The drafting-ahead strategy's name, None for none."""
        if self.drafting_ahead is not None:
            return None if self.drafting_ahead == "none" else self.drafting_ahead
        if self.overlap_drafting is not None:
            return "full-acceptance" if self.overlap_drafting else None
        return "full-acceptance" if self.profile == "gpu" else None

    @model_validator(mode="before")
    @classmethod
    def _role_and_profile_defaults(cls, data):
        """Partial overrides merge into each role's defaults; the gpu profile changes defaults only."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        gpu = data.get("profile") == "gpu"
        if gpu:
            models = dict(data.get("models") or {})
            models.setdefault("dtype", "bfloat16")
            models.setdefault("device", "cuda")
            data["models"] = models
            data.setdefault("drafters", ("ngram", "small", "medium"))
        for role, defaults in _ROLE_DEFAULTS.items():
            base = defaults().model_dump()
            if gpu:
                base["num_cpus"] = 1.0
                base["num_gpus"] = _GPU_SHARE[role]
                base["torch_threads"] = None  # kernels run on the GPU: Ray's one thread will do
            given = data.get(role)
            if isinstance(given, DeploymentSettings):
                given = given.model_dump(exclude_unset=True)
            data[role] = deep_merge(base, given or {})
        return data

    @model_validator(mode="after")
    def _unique_drafters(self) -> "AppSettings":
        if len(set(self.drafters)) != len(self.drafters):
            raise ValueError(f"drafters must not repeat: {self.drafters}")
        for role in ("verifier", "router"):  # only drafter replicas publish drafting load
            if self.deployment(role).autoscaling.policy != "ongoing-requests":
                raise ValueError(f"{role}.autoscaling.policy: only drafters scale on drafting-load")
        return self

    def deployment(self, role: str) -> DeploymentSettings:
        return getattr(self, role)
