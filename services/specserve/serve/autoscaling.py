"""How each deployment scales, and how to read replica counts back.

Each deployment gets its own Serve `autoscaling_config`, so drafters and the verifier scale apart
(DESIGN.md): the verifier on Serve's replica-queue-length policy over ITS OWN ongoing requests,
the drafters, by default, on what drafting itself says (`policy: drafting-load`):

* every drafter replica measures its drafting (DraftLoadMeter) and publishes it through Serve's
  `record_autoscaling_stats`: `drafting_demand` (busy seconds + queued calls x their median
  seconds, per second of the window: 1.0 = one replica's worth of drafting), `queued_drafts`,
  `draft_latency_ms` and `draft_over_verify` (median draft time / the verification it has to
  fit under, as the router reported it in each call);
* DrafterLoadPolicy, the Serve autoscaling policy of the drafter deployments, wants
  ceil(sum of demand / target_utilization) replicas, one more while drafts do not fit under
  verification (draft_over_verify above `max_draft_over_verify`) on busy replicas, and at least
  what the calls queued at the handles need (ongoing / target_ongoing_requests: a model-free
  drafter's calls are so short that its replicas look idle while calls wait in front of them),
  within min/max_replicas; Serve applies the up/downscale delays as for any policy.

Ongoing requests are a poor drafter signal: a drafter call is short and a round sends one per
drafter, so the count says little about whether drafting keeps up; busy time does.
`policy: ongoing-requests` keeps Serve's default for a drafter that wants it.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque

from .settings import AutoscalingSettings

DRAFTER_POLICY = "specserve.serve.autoscaling:DrafterLoadPolicy"


def autoscaling_config(settings: AutoscalingSettings) -> dict:
    """Serve's autoscaling_config dict (only the fields we set, so `serve build` output stays short)."""
    config = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "target_ongoing_requests": settings.target_ongoing_requests,
        "upscale_delay_s": settings.upscale_delay_s,
        "downscale_delay_s": settings.downscale_delay_s,
        "look_back_period_s": settings.look_back_period_s,
    }
    if settings.metrics_interval_s is not None:
        config["metrics_interval_s"] = settings.metrics_interval_s
    if settings.initial_replicas is not None:
        config["initial_replicas"] = settings.initial_replicas
    if settings.policy == "drafting-load":
        config["policy"] = {
            "policy_function": DRAFTER_POLICY,
            "policy_kwargs": {"target_utilization": settings.target_utilization,
                              "max_draft_over_verify": settings.max_draft_over_verify},
        }
    return config


class DraftLoadMeter:
    """One drafter replica's drafting over a sliding window: busy time (the union of its calls'
    intervals: calls on one replica serialize), calls in flight, latencies."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._done: deque = deque()  # (start, end, seconds, draft/verify ratio or None)
        self._in_flight: dict[int, float] = {}  # call token -> start
        self._next = 0

    def start(self) -> int:
        with self._lock:
            self._next += 1
            self._in_flight[self._next] = self._clock()
            return self._next

    def finish(self, token: int, verify_window_s: float = 0.0) -> None:
        with self._lock:
            start = self._in_flight.pop(token, None)
            if start is None:
                return
            end = self._clock()
            ratio = (end - start) / verify_window_s if verify_window_s > 0 else None
            self._done.append((start, end, end - start, ratio))
            self._trim(end)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][1] < now - self.window_s:
            self._done.popleft()

    def stats(self) -> dict[str, float]:
        """What the replica publishes through record_autoscaling_stats (all floats)."""
        with self._lock:
            now = self._clock()
            self._trim(now)
            since = now - self.window_s
            intervals = sorted([(max(s, since), e) for s, e, _, _ in self._done]
                               + [(max(s, since), now) for s in self._in_flight.values()])
            busy, reach = 0.0, since
            for s, e in intervals:  # union of intervals
                if e > reach:
                    busy += e - max(s, reach)
                    reach = e
            seconds = [d for _, _, d, _ in self._done]
            ratios = [r for _, _, _, r in self._done if r is not None]
            median_s = statistics.median(seconds) if seconds else 0.0
            queued = max(len(self._in_flight) - 1, 0)
            return {
                "drafting_demand": (busy + queued * median_s) / self.window_s,
                "queued_drafts": float(queued),
                "draft_latency_ms": 1e3 * median_s,
                "draft_over_verify": statistics.median(ratios) if ratios else 0.0,
            }


class DrafterLoadPolicy:
    """Serve custom autoscaling policy of a drafter deployment (module doc). Serve calls it with an
    AutoscalingContext whose `aggregated_metrics` holds each replica's record_autoscaling_stats,
    averaged over look_back_period_s; Serve then applies bounds and delays."""

    def __init__(self, target_utilization: float = 0.6, max_draft_over_verify: float = 1.0) -> None:
        if not 0 < target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
        self.target_utilization = target_utilization
        self.max_draft_over_verify = max_draft_over_verify

    def desired_replicas(self, current: int, demand: dict, over_verify: dict, ongoing: float = 0.0,
                         target_ongoing: float | None = None, bounds: tuple[int, int] = (0, 1 << 30)) -> int:
        queue_wanted = math.ceil(ongoing / target_ongoing - 1e-9) if target_ongoing else 0
        if not demand:  # nothing reported yet: keep what there is, unless calls queue up
            wanted = max(current, queue_wanted)
        else:
            total = sum(demand.values())
            wanted = math.ceil(total / self.target_utilization - 1e-9)
            late = [r for r in over_verify.values() if r > 0]
            if late and statistics.median(late) > self.max_draft_over_verify and total / max(current, 1) > 0.5:
                wanted = max(wanted, current + 1)  # drafts do not fit under verification
            wanted = max(wanted, queue_wanted, 1 if total > 0 else 0)
        low, high = bounds
        return min(max(wanted, low), high)

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        config = ctx.config
        wanted = self.desired_replicas(
            ctx.current_num_replicas, metrics.get("drafting_demand", {}), metrics.get("draft_over_verify", {}),
            ongoing=ctx.total_num_requests, target_ongoing=getattr(config, "target_ongoing_requests", None),
            bounds=(ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas),
        )
        return wanted, ctx.policy_state


def running_replicas(app_name: str) -> dict[str, int]:
    """Deployment name -> number of RUNNING replicas of a live Serve app (needs a Ray connection)."""
    from ray import serve

    status = serve.status().applications[app_name]
    return {
        name: deployment.replica_states.get("RUNNING", 0)
        for name, deployment in status.deployments.items()
    }
