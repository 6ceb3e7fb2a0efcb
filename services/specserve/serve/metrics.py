"""Prometheus metrics, with vLLM's spec-decode names under the `specserve_` prefix.

Counters (labelled by acceptance rule, and by drafter where a count belongs to one drafter):

  specserve_spec_decode_num_drafts_total{rule,drafter}          rounds in which the drafter proposed
  specserve_spec_decode_num_draft_tokens_total{rule,drafter}    draft tokens it proposed (scored by the verifier)
  specserve_spec_decode_num_accepted_tokens_total{rule,drafter} of those, accepted
  specserve_spec_decode_num_accepted_tokens_per_pos_total{rule,position}  accepted at depth `position` (0-based)
  specserve_spec_decode_num_verify_steps_total{rule}            verifier steps (rounds), all drafters together

Mean acceptance length (accepted draft tokens per verifier step, the extra token excluded) is a gauge
`specserve_spec_decode_mean_acceptance_length{rule}` kept from the running totals, and the per-round
distribution is the histogram `specserve_spec_decode_acceptance_length{rule}`; in PromQL
`rate(..._num_accepted_tokens_total) / rate(..._num_verify_steps_total)` gives the same over a window.

Latency histograms: time to first token, per round, per request. Request counters by final gRPC status.

Two backends, same metric objects for the callers (`.labels(...).inc()/.observe()/.set()`):

* "prometheus" (standalone server): each `ServeMetrics` owns a prometheus_client registry (several
  servers can live in one process, e.g. in tests); the server exposes it with
  `start_http_server(port, registry=metrics.registry)`.
* "ray" (the Router replica of the Ray Serve app): the same metrics recorded through
  `ray.serve.metrics`, which Ray's per-node metrics agent exports on its metrics port (8080 in
  k8s/, scraped by the PodMonitor) with the deployment/replica tags added. Ray prefixes
  application metric names with `ray_` there.
"""

from __future__ import annotations

from collections import defaultdict

from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..engine.types import RoundResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


class _RayMetric:
    """prometheus_client's labelled-metric calls on top of a ray.serve.metrics object."""

    def __init__(self, metric: Any, tag_keys: tuple[str, ...]) -> None:
        self._metric = metric
        self._tag_keys = tag_keys
        self._tags: dict[str, str] = {}
        self._value = 0.0  # Ray gauges only `set`: inc/dec keep the value here

    def labels(self, *values: str) -> "_RayMetric":
        bound = _RayMetric(self._metric, self._tag_keys)
        bound._tags = dict(zip(self._tag_keys, (str(v) for v in values)))
        return bound

    def inc(self, amount: float = 1.0) -> None:
        if hasattr(self._metric, "inc"):
            if amount > 0:  # Ray counters refuse 0 (prometheus_client takes it as a no-op)
                self._metric.inc(amount, tags=self._tags or None)
        else:
            self._value += amount
            self._metric.set(self._value, tags=self._tags or None)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def set(self, value: float) -> None:
        self._value = value
        self._metric.set(value, tags=self._tags or None)

    def observe(self, value: float) -> None:
        self._metric.observe(value, tags=self._tags or None)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 backend: Literal["prometheus", "ray"] = "prometheus"):
        if backend not in ("prometheus", "ray"):
            raise ValueError(f"backend must be 'prometheus' or 'ray', got {backend!r}")
        self.backend = backend
        self.registry = registry if registry is not None else CollectorRegistry()
        p = "specserve_spec_decode_"
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.num_drafts = counter(p + "num_drafts", "Rounds in which a drafter proposed", ["rule", "drafter"])
        self.num_draft_tokens = counter(p + "num_draft_tokens", "Draft tokens proposed and scored", ["rule", "drafter"])
        self.num_accepted_tokens = counter(p + "num_accepted_tokens", "Draft tokens accepted", ["rule", "drafter"])
        self.num_accepted_tokens_per_pos = counter(
            p + "num_accepted_tokens_per_pos", "Accepted draft tokens by depth (0-based)", ["rule", "position"]
        )
        self.num_verify_steps = counter(p + "num_verify_steps", "Verifier steps (rounds)", ["rule"])
        self.mean_acceptance_length = gauge(
            p + "mean_acceptance_length", "Accepted draft tokens per verifier step (running mean)", ["rule"]
        )
        self.acceptance_length = histogram(
            p + "acceptance_length", "Accepted draft tokens per round", ["rule"], _LENGTH_BUCKETS
        )
        self.time_to_first_token = histogram(
            "specserve_time_to_first_token_seconds", "Request start to first streamed token", ["rule"], _LATENCY_BUCKETS
        )
        self.round_seconds = histogram(
            "specserve_round_seconds", "Wall time of one draft/verify round", ["rule"], _LATENCY_BUCKETS
        )
        self.request_seconds = histogram(
            "specserve_request_seconds", "Wall time of a whole request", ["rule"], _LATENCY_BUCKETS
        )
        self.requests = counter("specserve_requests", "Finished requests by gRPC status", ["rule", "status"])
        self.generated_tokens = counter("specserve_generated_tokens", "Generated tokens", ["rule"])
        self.prompt_tokens = counter("specserve_prompt_tokens", "Prompt tokens", ["rule"])
        self.requests_running = gauge("specserve_requests_running", "Requests being served now", [])
        self._steps: dict[str, int] = defaultdict(int)
        self._accepted: dict[str, int] = defaultdict(int)

    # ---- metric factories per backend -------------------------------------------------
    def _counter(self, name: str, doc: str, labels: list[str]):
        if self.backend == "ray":
            from ray.serve import metrics as ray_metrics

            return _RayMetric(ray_metrics.Counter(name, description=doc, tag_keys=tuple(labels)), tuple(labels))
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: list[str]):
        if self.backend == "ray":
            from ray.serve import metrics as ray_metrics

            return _RayMetric(ray_metrics.Gauge(name, description=doc, tag_keys=tuple(labels)), tuple(labels))
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, labels: list[str], buckets: tuple[float, ...]):
        if self.backend == "ray":
            from ray.serve import metrics as ray_metrics

            # Ray wants strictly positive boundaries: the 0 bucket becomes "<= 0.5" for counts
            boundaries = [b if b > 0 else 0.5 for b in buckets]
            metric = ray_metrics.Histogram(name, description=doc, boundaries=boundaries, tag_keys=tuple(labels))
            return _RayMetric(metric, tuple(labels))
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def observe_round(self, rule: str, r: RoundResult, seconds: float) -> None:
        for drafter, n in r.drafted_by_drafter.items():
            if n > 0:
                self.num_drafts.labels(rule, drafter).inc()
                self.num_draft_tokens.labels(rule, drafter).inc(n)
        for drafter, n in r.accepted_by_drafter.items():
            self.num_accepted_tokens.labels(rule, drafter).inc(n)
        for pos in range(r.num_accepted):  # the accepted nodes are one path: depths 0..num_accepted-1
            self.num_accepted_tokens_per_pos.labels(rule, str(pos)).inc()
        self.num_verify_steps.labels(rule).inc()
        self.acceptance_length.labels(rule).observe(r.num_accepted)
        self.generated_tokens.labels(rule).inc(len(r.tokens))
        self.round_seconds.labels(rule).observe(seconds)
        self._steps[rule] += 1
        self._accepted[rule] += r.num_accepted
        self.mean_acceptance_length.labels(rule).set(self._accepted[rule] / self._steps[rule])

    def serve_http(self, port: int, address: str = "127.0.0.1"):
        """Expose /metrics on an HTTP port (returns the server and its thread)."""
        return start_http_server(port, addr=address, registry=self.registry)
