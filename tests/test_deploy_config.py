"""deploy/*.yaml stay in sync with the code and are valid Serve configs.

The files are `serve build` output plus overlays (serve/app.py `render_config`); here they are
regenerated in-process and compared, so a change to a deployment name, an import path, the
autoscaling defaults or the actor options that is not followed by `python -m specserve.serve.app
--write deploy/` fails CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from specserve.serve.app import CONFIGS, GRPC_SERVICER_FUNCTION, build_app, render_config  # noqa: E402
from specserve.serve.settings import DEPLOYMENT_NAMES, AppSettings  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def load(profile: str) -> dict:
    return yaml.safe_load((DEPLOY / CONFIGS[profile]["file"]).read_text())


@pytest.mark.parametrize("profile", sorted(CONFIGS))
def test_checked_in_config_equals_serve_build_output(profile):
    assert load(profile) == render_config(profile), (
        f"deploy/{CONFIGS[profile]['file']} is stale: run `python -m specserve.serve.app --write deploy/`"
    )


@pytest.mark.parametrize("profile", sorted(CONFIGS))
def test_config_validates_and_matches_settings(profile):
    config = load(profile)
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == CONFIGS[profile]["import_path"]
    assert config["grpc_options"]["grpc_servicer_functions"] == [GRPC_SERVICER_FUNCTION]
    if profile == "cpu":
        assert config["grpc_options"]["port"] >= 20000

    settings = AppSettings.model_validate({"profile": profile})
    roles = [*settings.drafters, "verifier", "router"]
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert set(deployments) == {DEPLOYMENT_NAMES[r] for r in roles}
    for role in roles:
        d = deployments[DEPLOYMENT_NAMES[role]]
        spec = settings.deployment(role)
        assert d["autoscaling_config"]["min_replicas"] == spec.autoscaling.min_replicas
        assert d["autoscaling_config"]["max_replicas"] == spec.autoscaling.max_replicas
        assert d["ray_actor_options"]["num_cpus"] == spec.num_cpus
        assert d["ray_actor_options"].get("num_gpus", 0.0) == spec.num_gpus
        # workers route by session id (KV-cache affinity); the router is the ingress
        assert ("request_router_config" in d) == (role != "router")


def test_import_paths_resolve_to_applications():
    import importlib

    for spec in CONFIGS.values():
        module, attr = spec["import_path"].split(":")
        assert type(getattr(importlib.import_module(module), attr)).__name__ == "Application"


def test_gpu_profile_puts_models_on_gpus():
    settings = AppSettings.model_validate({"profile": "gpu"})
    assert settings.verifier.num_gpus == 1.0 and settings.ngram.num_gpus == 0.0
    assert settings.models.device == "cuda" and settings.drafters == ("ngram", "small", "medium")
    # explicit values still win over the profile
    custom = AppSettings.model_validate({"profile": "gpu", "verifier": {"num_gpus": 2}})
    assert custom.verifier.num_gpus == 2 and custom.verifier.autoscaling.max_replicas == 2


def test_cpu_model_replicas_take_every_core_and_gpu_ones_keep_rays_threads():
    cpu = AppSettings.model_validate({})
    assert cpu.verifier.torch_threads == 0 and cpu.small.torch_threads == 0 and cpu.router.torch_threads is None
    gpu = AppSettings.model_validate({"profile": "gpu"})
    assert gpu.verifier.torch_threads is None and gpu.medium.torch_threads is None
    assert AppSettings.model_validate({"verifier": {"torch_threads": 1}}).verifier.torch_threads == 1
    with pytest.raises(ValueError, match="torch_threads"):
        AppSettings.model_validate({"verifier": {"torch_threads": -1}})


def test_settings_reject_unknown_and_inconsistent_fields():
    with pytest.raises(ValueError):
        AppSettings.model_validate({"drafterz": ["ngram"]})
    with pytest.raises(ValueError):
        AppSettings.model_validate({"drafters": ["ngram", "ngram"]})
    with pytest.raises(ValueError):
        AppSettings.model_validate({"ngram": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ValueError):
        build_app({"drafters": ["huge"]})


@pytest.mark.parametrize(
    "overrides, expected",
    [({"profile": "cpu"}, None), ({"profile": "gpu"}, "full-acceptance"),
     ({"profile": "gpu", "overlap_drafting": False}, None), ({"profile": "cpu", "overlap_drafting": True}, "full-acceptance"),
     ({"profile": "cpu", "drafting_ahead": "enumerate-select"}, "enumerate-select"),
     ({"profile": "gpu", "drafting_ahead": "none"}, None)],
)
def test_drafting_ahead_defaults_on_for_gpu_only(overrides, expected):
    # on one CPU the drafters would compete with the verifier for the same cores
    assert AppSettings.model_validate(overrides).ahead == expected


def test_enumerate_select_settings_reach_the_strategy():
    from specserve.serve.deployments import _make_loop

    settings = AppSettings.model_validate({"drafting_ahead": "enumerate-select", "ahead_units": 5,
                                           "ahead_miss_drafters": "instant"})
    strategy = _make_loop(settings, verifier=None, drafters=[]).ahead
    assert (strategy.units, strategy.miss_drafters) == (5, "instant")
    with pytest.raises(ValueError, match="ahead_miss_drafters"):
        AppSettings.model_validate({"ahead_miss_drafters": "sometimes"})


def test_a_local_ray_runs_its_workers_at_nice_0_unless_the_environment_says(monkeypatch):
    from specserve.serve.app import local_system_config

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert local_system_config() == {"worker_niceness": 0}
    monkeypatch.setenv("RAY_worker_niceness", "15")
    assert local_system_config() == {}
