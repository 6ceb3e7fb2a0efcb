"""The Ray Serve application: `build_app(args)` and the config files in deploy/.

    serve run specserve.serve.app:app                         # embedded default, this machine
    serve run specserve.serve.app:build_app profile=gpu       # any AppSettings field as key=value
    serve run deploy/local.yaml                               # the checked-in config
    python -m specserve.serve.app --write deploy/             # regenerate deploy/*.yaml

deploy/local.yaml and deploy/gpu.yaml are `serve build` output (in-process, the same function the
CLI runs) plus three overlays `serve build` has no flags for: the application name, the ports
(gRPC >= 20000 locally so tests and dev boxes never clash with a default 9000), and the HTTP host.
tests/test_deploy_config.py regenerates them and fails when the checked-in files drift.

Graph (round_driver "verifier", the default): Router(verifier=<Verifier(drafters={kind: <drafter
deployment>})>): the router streams each request from a verifier replica, which runs its rounds and
calls the drafters. round_driver "router": Router(verifier=<Verifier>, drafters={...}), the router
runs the rounds and calls both every round. Each deployment has its
own ray_actor_options and autoscaling_config; worker deployments route by session id with Serve's
ConsistentHashRouter, so a session sticks to the replica holding its KV cache while that replica lives.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from pathlib import Path

import yaml
from ray import serve
from ray.serve.config import RequestRouterConfig

from .autoscaling import autoscaling_config
from .deployments import DRAFTER_DEPLOYMENTS, Router, Verifier
from .settings import AppSettings

GRPC_SERVICER_FUNCTION = "specserve.v1.generation_pb2_grpc.add_GenerationServicer_to_server"
AFFINITY_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
# Receive limit of Serve's interdeployment gRPC server and channels (read by each replica at start).
GRPC_MESSAGE_LIMIT_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"

# Profile -> (import path, deploy file, overlays on `serve build` output)
CONFIGS = {
    "cpu": {
        "import_path": "specserve.serve.app:app",
        "file": "local.yaml",
        "http_options": {"host": "127.0.0.1", "port": 20080},
        "grpc_port": 20051,
    },
    "gpu": {
        "import_path": "specserve.serve.app:gpu_app",
        "file": "gpu.yaml",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "grpc_port": 9000,  # Serve's default, what KubeRay services expose
    },
}


def deployment_options(settings: AppSettings, role: str) -> dict:
    """Serve options of one deployment (role = a drafter kind, "verifier" or "router")."""
    spec = settings.deployment(role)
    actor_options = spec.ray_actor_options()
    actor_options["runtime_env"] = {"env_vars": {GRPC_MESSAGE_LIMIT_ENV: str(settings.max_message_bytes)}}
    options = {
        "ray_actor_options": actor_options,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "autoscaling_config": autoscaling_config(spec.autoscaling),
    }
    if role != "router" and settings.session_affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=AFFINITY_ROUTER,
            # on a rejected (full) primary, try the next 2 replicas on the ring before backing off
            request_router_kwargs={"num_fallback_replicas": 2},
        )
    return options


def build_app(args: dict | None = None) -> serve.Application:
    """Serve application builder: `args` are AppSettings fields (validated, unknown keys rejected)."""
    settings = AppSettings.model_validate(dict(args or {}))
    payload = settings.model_dump(mode="json")
    drafters = {
        kind: DRAFTER_DEPLOYMENTS[kind].options(**deployment_options(settings, kind)).bind(payload)
        for kind in settings.drafters
    }
    verifier_options = deployment_options(settings, "verifier")
    router_options = deployment_options(settings, "router")
    if settings.round_driver == "verifier":  # the verifier replica runs the rounds, calling drafters
        verifier = Verifier.options(**verifier_options).bind(payload, drafters)
        return Router.options(**router_options).bind(verifier, payload)
    verifier = Verifier.options(**verifier_options).bind(payload)
    return Router.options(**router_options).bind(verifier, payload, drafters)


app = build_app({})
gpu_app = build_app({"profile": "gpu"})


# ---------------------------------------------------------------- config files


def render_config(profile: str) -> dict:
    """The deploy/ config of a profile: `serve build` output + our overlays (validated)."""
    from ray.serve.schema import ServeDeploySchema
    from ray.serve.scripts import build as serve_build_command

    spec = CONFIGS[profile]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "config.yaml")
        serve_build_command.callback(
            import_paths=(spec["import_path"],),
            app_dir=".",
            output_path=out,
            grpc_servicer_functions=[GRPC_SERVICER_FUNCTION],
            grpc_enable_reflection=True,
        )
        config = yaml.safe_load(Path(out).read_text())
    config["http_options"] = dict(spec["http_options"])
    config["grpc_options"]["port"] = spec["grpc_port"]
    config["applications"][0]["name"] = "specserve"
    ServeDeploySchema.model_validate(config)
    return config


def write_configs(directory: str | Path) -> list[Path]:
    written = []
    for profile, spec in CONFIGS.items():
        path = Path(directory) / spec["file"]
        header = (
            f"# Generated by `python -m specserve.serve.app --write {directory}` (serve build of "
            f"{spec['import_path']} + name/port overlays). Do not edit by hand.\n"
        )
        path.write_text(header + yaml.safe_dump(render_config(profile), sort_keys=False, width=100))
        written.append(path)
    return written


# ---------------------------------------------------------------- running a config


def local_system_config() -> dict:
    """Ray system config for a cluster this process starts on one machine. Ray runs its workers at
    nice 15 so that the raylet and GCS always win a core; on a box where the model replicas share
    the cores with them, every such wake-up pre-empts one thread of a forward's OpenMP team, and
    the team waits for its slowest thread (the Ray app's round cost 1.15x the in-process engine's
    at nice 15, 1.08x at nice 0: BENCHMARKS.md section 4). RAY_worker_niceness in the environment
    still wins."""
    return {} if "RAY_worker_niceness" in os.environ else {"worker_niceness": 0}


def run_local(config_path: str | Path, address: str | None = None, blocking: bool = False) -> None:
    """Deploy every application of a Serve config file on a Ray cluster (`address`, or a new local
    one) without the dashboard's REST API: start Serve with the file's proxy/HTTP/gRPC options,
    then `serve.run` each application (an import path to an Application or to a builder + args)."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(Path(config_path).read_text()))
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, _system_config=local_system_config())
    serve.start(
        proxy_location=config.proxy_location,
        http_options=config.http_options.model_dump(exclude_unset=True),
        grpc_options=config.grpc_options.model_dump(exclude_unset=True),
    )
    for app_config in config.applications:
        module_name, _, attr = app_config.import_path.replace(":", ".").rpartition(".")
        target = getattr(importlib.import_module(module_name), attr)
        application = target if isinstance(target, serve.Application) else target(app_config.args or {})
        serve.run(application, name=app_config.name, route_prefix=app_config.route_prefix,
                  blocking=False)
    if blocking:
        import time

        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="DIR", help="regenerate DIR/local.yaml and DIR/gpu.yaml")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_configs(args.write):
            print(path)


if __name__ == "__main__":
    main()
