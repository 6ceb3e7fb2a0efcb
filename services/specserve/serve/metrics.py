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

Each `ServeMetrics` owns its registry (several servers can live in one process, e.g. in tests);
the standalone server exposes it with `start_http_server(port, registry=metrics.registry)`.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..engine.types import RoundResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "specserve_spec_decode_"
        self.num_drafts = Counter(p + "num_drafts", "Rounds in which a drafter proposed", ["rule", "drafter"], registry=r)
        self.num_draft_tokens = Counter(
            p + "num_draft_tokens", "Draft tokens proposed and scored", ["rule", "drafter"], registry=r
        )
        self.num_accepted_tokens = Counter(
            p + "num_accepted_tokens", "Draft tokens accepted", ["rule", "drafter"], registry=r
        )
        self.num_accepted_tokens_per_pos = Counter(
            p + "num_accepted_tokens_per_pos", "Accepted draft tokens by depth (0-based)", ["rule", "position"], registry=r
        )
        self.num_verify_steps = Counter(p + "num_verify_steps", "Verifier steps (rounds)", ["rule"], registry=r)
        self.mean_acceptance_length = Gauge(
            p + "mean_acceptance_length", "Accepted draft tokens per verifier step (running mean)", ["rule"], registry=r
        )
        self.acceptance_length = Histogram(
            p + "acceptance_length", "Accepted draft tokens per round", ["rule"], buckets=_LENGTH_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "specserve_time_to_first_token_seconds", "Request start to first streamed token", ["rule"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.round_seconds = Histogram(
            "specserve_round_seconds", "Wall time of one draft/verify round", ["rule"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "specserve_request_seconds", "Wall time of a whole request", ["rule"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.requests = Counter("specserve_requests", "Finished requests by gRPC status", ["rule", "status"], registry=r)
        self.generated_tokens = Counter("specserve_generated_tokens", "Generated tokens", ["rule"], registry=r)
        self.prompt_tokens = Counter("specserve_prompt_tokens", "Prompt tokens", ["rule"], registry=r)
        self.requests_running = Gauge("specserve_requests_running", "Requests being served now", registry=r)
        self._steps: dict[str, int] = defaultdict(int)
        self._accepted: dict[str, int] = defaultdict(int)

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
