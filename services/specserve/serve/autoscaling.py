"""How each deployment scales, and how to read replica counts back.

Each deployment gets its own Serve `autoscaling_config` and Serve's replica-queue-length policy
scales it on ITS OWN ongoing requests (counted at the handles). That is the independence DESIGN.md
asks for: a burst of drafter calls (several drafters per round, one call per round per drafter)
raises the drafters' ongoing count and so their replica count, while the verifier's count only
follows verify calls. No custom policy is needed for that, and the built-in one is the one Serve
users know (target_ongoing_requests, upscale/downscale delays).
"""

from __future__ import annotations

from .settings import AutoscalingSettings


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
    return config


def running_replicas(app_name: str) -> dict[str, int]:
    """Deployment name -> number of RUNNING replicas of a live Serve app (needs a Ray connection)."""
    from ray import serve

    status = serve.status().applications[app_name]
    return {
        name: deployment.replica_states.get("RUNNING", 0)
        for name, deployment in status.deployments.items()
    }
