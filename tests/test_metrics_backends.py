"""ServeMetrics records the same metrics through prometheus_client (standalone server) and through
ray.serve.metrics (the Ray Serve router): the Ray backend is checked with recording fakes."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from specserve.engine.types import RoundResult
from specserve.serve.metrics import ServeMetrics

ROUND = RoundResult(tokens=[4, 5, 6], num_drafted=3, num_accepted=2, accepted_by_drafter={"lm": 2},
                    drafted_by_drafter={"lm": 3}, drafted_depth=3)


class _Recorder:
    calls: list = []

    def __init__(self, name, description="", tag_keys=None, boundaries=None):
        self.name, self.tag_keys, self.boundaries = name, tag_keys, boundaries
        _Recorder.calls.append(("new", type(self).__name__, name, boundaries))

    def _record(self, op, value, tags):
        assert set(tags or {}) == set(self.tag_keys or ()), (self.name, tags)  # every tag key given
        _Recorder.calls.append((op, self.name, value, dict(tags or {})))


class FakeCounter(_Recorder):
    def inc(self, value=1.0, tags=None):
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")  # as ray.util.metrics.Counter
        self._record("inc", value, tags)


class FakeGauge(_Recorder):
    def set(self, value, tags=None):
        self._record("set", value, tags)


class FakeHistogram(_Recorder):
    def observe(self, value, tags=None):
        self._record("observe", value, tags)


@pytest.fixture
def ray_metrics(monkeypatch):
    from ray.serve import metrics as ray_serve_metrics

    monkeypatch.setattr(ray_serve_metrics, "Counter", FakeCounter)
    monkeypatch.setattr(ray_serve_metrics, "Gauge", FakeGauge)
    monkeypatch.setattr(ray_serve_metrics, "Histogram", FakeHistogram)
    _Recorder.calls = []
    return _Recorder.calls


def test_ray_backend_records_rounds_with_tags(ray_metrics):
    metrics = ServeMetrics(backend="ray")
    metrics.observe_round("sps", ROUND, 0.25)
    metrics.observe_round("sps", RoundResult(tokens=[], num_drafted=0, num_accepted=0), 0.1)  # zero counts
    metrics.generated_tokens.labels("sps").inc(0)
    metrics.requests_running.inc()
    metrics.requests_running.inc()
    metrics.requests_running.dec()
    calls = ray_metrics
    assert ("inc", "specserve_spec_decode_num_draft_tokens", 3, {"rule": "sps", "drafter": "lm"}) in calls
    assert ("inc", "specserve_spec_decode_num_accepted_tokens", 2, {"rule": "sps", "drafter": "lm"}) in calls
    per_pos = [c for c in calls if c[:2] == ("inc", "specserve_spec_decode_num_accepted_tokens_per_pos")]
    assert [c[3]["position"] for c in per_pos] == ["0", "1"]
    assert ("set", "specserve_spec_decode_mean_acceptance_length", 1.0, {"rule": "sps"}) in calls  # 2 / 2 rounds
    assert ("observe", "specserve_round_seconds", 0.25, {"rule": "sps"}) in calls
    # the gauge follows inc/dec although Ray gauges can only be set
    running = [c[2] for c in calls if c[:2] == ("set", "specserve_requests_running")]
    assert running == [1.0, 2.0, 1.0]
    # Ray refuses non-positive histogram boundaries
    for _, kind, _, boundaries in (c for c in calls if c[0] == "new" and c[1] == "FakeHistogram"):
        assert boundaries and min(boundaries) > 0 and boundaries == sorted(boundaries)


def test_prometheus_backend_exports_the_same_round():
    metrics = ServeMetrics()
    metrics.observe_round("sps", ROUND, 0.25)
    body = generate_latest(metrics.registry).decode()
    assert 'specserve_spec_decode_num_accepted_tokens_total{drafter="lm",rule="sps"} 2.0' in body
    assert 'specserve_spec_decode_num_accepted_tokens_per_pos_total{position="1",rule="sps"} 1.0' in body


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        ServeMetrics(backend="statsd")
