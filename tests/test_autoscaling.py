"""The drafters' scaling signal (serve/autoscaling.py): what a drafter replica publishes through
Serve's record_autoscaling_stats, the policy that turns it into a replica count, and the config
that wires the policy to the drafter deployments only. (A real cluster scaling on it:
tests/test_ray_cluster.py.)"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig

from specserve.serve.app import deployment_options
from specserve.serve.autoscaling import DRAFTER_POLICY, DraftLoadMeter, DrafterLoadPolicy
from specserve.serve.settings import AppSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_reports_busy_fraction_queue_and_latency():
    clock = Clock()
    meter = DraftLoadMeter(window_s=10.0, clock=clock)
    for _ in range(4):  # four back-to-back 0.5 s drafts, each under a 1 s verification
        token = meter.start()
        clock.now += 0.5
        meter.finish(token, verify_window_s=1.0)
    stats = meter.stats()
    assert stats["drafting_demand"] == pytest.approx(0.2)  # 2 s busy in a 10 s window
    assert stats["draft_latency_ms"] == pytest.approx(500.0)
    assert stats["draft_over_verify"] == pytest.approx(0.5)
    assert stats["queued_drafts"] == 0.0

    # three calls arrive at once: one runs, two wait; the waiting ones count as demand
    tokens = [meter.start() for _ in range(3)]
    clock.now += 1.0
    stats = meter.stats()
    assert stats["queued_drafts"] == 2.0
    assert stats["drafting_demand"] == pytest.approx((2.0 + 1.0 + 2 * 0.5) / 10.0)
    for token in tokens:
        meter.finish(token)
    clock.now += 20.0  # everything has left the window
    assert meter.stats()["drafting_demand"] == 0.0


def test_overlapping_calls_are_counted_once():
    clock = Clock()
    meter = DraftLoadMeter(window_s=4.0, clock=clock)
    a, b = meter.start(), meter.start()
    clock.now += 1.0
    meter.finish(a)
    meter.finish(b)
    assert meter.stats()["drafting_demand"] == pytest.approx(0.25)


def test_policy_wants_demand_over_target_and_one_more_when_drafts_are_late():
    policy = DrafterLoadPolicy(target_utilization=0.5, max_draft_over_verify=1.0)
    assert policy.desired_replicas(1, {}, {}) == 1  # nothing reported: keep
    assert policy.desired_replicas(1, {"r1": 0.9}, {"r1": 0.2}) == 2  # 0.9 / 0.5
    assert policy.desired_replicas(2, {"r1": 1.0, "r2": 1.0}, {}) == 4
    assert policy.desired_replicas(3, {"r1": 0.1, "r2": 0.0, "r3": 0.0}, {}) == 1  # scale down
    assert policy.desired_replicas(2, {"r1": 0.0, "r2": 0.0}, {}) == 0
    assert policy.desired_replicas(2, {"r1": 0.0, "r2": 0.0}, {}, bounds=(1, 4)) == 1  # never below min_replicas
    assert policy.desired_replicas(1, {"r1": 3.0}, {}, bounds=(1, 4)) == 4  # nor above max_replicas
    # short calls queued at the handles: idle-looking replicas, but calls wait in front of them
    assert policy.desired_replicas(1, {"r1": 0.05}, {}, ongoing=6, target_ongoing=2) == 3
    assert policy.desired_replicas(1, {}, {}, ongoing=6, target_ongoing=2) == 3
    # busy and late (drafts longer than the verification they must hide behind): one more
    loose = DrafterLoadPolicy(target_utilization=0.8, max_draft_over_verify=1.0)
    assert loose.desired_replicas(2, {"r1": 0.6, "r2": 0.6}, {"r1": 0.9, "r2": 0.8}) == 2  # on time
    assert loose.desired_replicas(2, {"r1": 0.6, "r2": 0.6}, {"r1": 1.5, "r2": 1.4}) == 3
    assert loose.desired_replicas(2, {"r1": 0.1, "r2": 0.1}, {"r1": 1.5, "r2": 1.4}) == 1  # late but idle


def test_policy_reads_serves_context():
    class Ctx:
        current_num_replicas = 1
        aggregated_metrics = {"drafting_demand": {"replica-a": 1.2}, "draft_over_verify": {"replica-a": 0.3}}
        policy_state = {"kept": True}
        total_num_requests = 1.0
        capacity_adjusted_min_replicas, capacity_adjusted_max_replicas = 1, 3

        class config:  # noqa: N801 - Serve's AutoscalingConfig, the field the policy reads
            target_ongoing_requests = 2.0

    assert DrafterLoadPolicy(target_utilization=0.6)(Ctx()) == (2, {"kept": True})
    Ctx.total_num_requests = 40.0  # a long queue at the handles: as many as allowed
    assert DrafterLoadPolicy(target_utilization=0.6)(Ctx())[0] == 3


def test_drafters_scale_on_drafting_load_and_the_verifier_does_not():
    settings = AppSettings.model_validate({"drafters": ["ngram", "small", "medium"]})
    for role in ("ngram", "small", "medium"):
        config = deployment_options(settings, role)["autoscaling_config"]
        assert config["policy"]["policy_function"] == DRAFTER_POLICY
        parsed = AutoscalingConfig(**config)  # Serve accepts it and can import the policy
        assert isinstance(parsed.policy.get_policy(), type)
    for role in ("verifier", "router"):
        assert "policy" not in deployment_options(settings, role)["autoscaling_config"]
    with pytest.raises(ValidationError, match="verifier.autoscaling.policy"):
        AppSettings.model_validate({"verifier": {"autoscaling": {"policy": "drafting-load"}}})
    classic = AppSettings.model_validate({"ngram": {"autoscaling": {"policy": "ongoing-requests"}}})
    assert "policy" not in deployment_options(classic, "ngram")["autoscaling_config"]


def test_policy_kwargs_come_from_the_settings():
    settings = AppSettings.model_validate({"ngram": {"autoscaling": {"target_utilization": 0.8}}})
    kwargs = deployment_options(settings, "ngram")["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs == {"target_utilization": 0.8, "max_draft_over_verify": 1.0}
    with pytest.raises(ValidationError, match="target_utilization"):
        AppSettings.model_validate({"ngram": {"autoscaling": {"target_utilization": 0}}})
