"""Offline validation of the Kubernetes deployment (k8s/), plus one live Ray Serve smoke test.

No API server runs here, so each layer is checked with the tool that owns its format:

* the RayService against JSON Schema derived from KubeRay's CRD (strict: unknown fields rejected,
  as `kubectl apply` does with server-side field validation);
* core kinds (and every Ray pod template) with kubernetes-validate --strict;
* serveConfigV2 with Ray's own ServeDeploySchema, and against the app's code (names, import paths);
* placement: with the Ray autoscaler's own RayCluster -> node types derivation, every deployment fits
  exactly the worker pool meant for it, and each pool's maxReplicas holds its deployments' max_replicas;
* `kubectl kustomize` renders the base, both overlays, and the monitoring component;
* the readiness probe script against a fake and (slow test) a real Serve gRPC proxy.

Each check also gets a deliberately broken input, to show it can fail.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_PATH = REPO.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
PROBE_SCRIPT = K8S / "probes" / "serve_grpc_healthz.py"
KUBERNETES_VERSION = "1.33.0"  # oldest version kubernetes-validate 1.37 ships; KubeRay supports it
KUSTOMIZE_TARGETS = ["base", "overlays/cpu-dev", "overlays/gpu"]
# Which worker pool (custom Ray resource) each deployment must land on.
POOL_OF_DEPLOYMENT = {
    "Router": "router",
    "NgramDrafter": "drafter",
    "SmallDrafter": "drafter",
    "MediumDrafter": "drafter",
    "Verifier": "verifier",
}
POOLS = ("router", "drafter", "verifier")

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
needs_crd = pytest.mark.skipif(not CRD_PATH.exists(), reason=f"KubeRay CRD not found at {CRD_PATH}")


# ---- loading ------------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def load_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@lru_cache(maxsize=None)
def _render_cached(target: str) -> str:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {target} failed:\n{result.stderr}")
    return result.stdout


def render(target: str) -> list[dict]:
    """The objects `kubectl kustomize k8s/<target>` produces (fresh copies)."""
    return [d for d in yaml.safe_load_all(_render_cached(target)) if d]


def rayservice_of(objects: list[dict]) -> dict:
    (rs,) = [o for o in objects if o["kind"] == "RayService"]
    return rs


def serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def base_rayservice() -> dict:
    return rayservice_of(load_docs(K8S / "base" / "rayservice.yaml"))


# ---- check 1: the RayService against the CRD ----------------------------------------------------
def openapi_to_jsonschema(node):
    """KubeRay's openAPIV3Schema -> JSON Schema (draft 7) with API-server semantics:

    * `nullable: true` -> null is allowed;
    * `x-kubernetes-int-or-string` -> integer or string (the CRD already spells the anyOf; we add it
      where it does not);
    * objects with `properties` and no `additionalProperties` / preserve-unknown-fields reject
      unknown fields, as strict field validation does (the default of `kubectl apply`);
    * other x-kubernetes-* keys (list types, map types, CEL validations) are dropped: they constrain
      updates or merges, not the shape of one object.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    elif (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=1)
def rayservice_validator() -> jsonschema.Draft7Validator:
    crd = load_docs(CRD_PATH)[0]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(rayservice: dict) -> list[str]:
    errors = []
    if rayservice.get("apiVersion") != "ray.io/v1" or rayservice.get("kind") != "RayService":
        errors.append(f"not a ray.io/v1 RayService: {rayservice.get('apiVersion')} {rayservice.get('kind')}")
    for e in rayservice_validator().iter_errors(rayservice):
        errors.append(f"{'/'.join(map(str, e.absolute_path))}: {e.message}")
    return errors


# ---- check 2: core kinds and pod templates with kubernetes-validate --strict --------------------
def pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}"]
    return []


def pod_template_errors(rayservice: dict) -> list[str]:
    errors = []
    for name, template in pod_templates(rayservice).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        errors += core_errors(wrapped)
    return errors


# ---- check 3: serveConfigV2 with Ray Serve's schema and against the code -------------------------
def serve_schema_errors(serve_config: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(serve_config)
    except Exception as e:  # pydantic.ValidationError; Ray may wrap it
        return [str(e)]
    return []


def app_deployments(serve_config: dict) -> dict[str, dict]:
    """The deployments the app's builder makes from the manifest's args, as Serve will run them:
    name -> {"ray_actor_options": ..., "max_replicas": ...}. Raises if the args are invalid."""
    from ray.serve._private.build_app import build_app
    from ray.serve.api import Application

    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    target = getattr(importlib.import_module(module), attr)
    application = target if isinstance(target, Application) else target(app.get("args") or {})
    deployments = {}
    for d in build_app(application, name=app["name"]).deployments:
        autoscaling = d._deployment_config.autoscaling_config
        deployments[d.name] = {
            "ray_actor_options": d.ray_actor_options,
            "max_replicas": autoscaling.max_replicas if autoscaling else d.num_replicas,
        }
    # A `deployments:` override list would replace these ray_actor_options wholesale.
    for override in app.get("deployments", []):
        if "ray_actor_options" in override:
            deployments[override["name"]]["ray_actor_options"] = override["ray_actor_options"]
    return deployments


def serve_code_errors(serve_config: dict) -> list[str]:
    """serveConfigV2 names what the code defines: the gRPC servicer function, the import path, valid
    builder args, and the five deployments (each keeping the runtime_env the app sets)."""
    errors = []
    for path in serve_config.get("grpc_options", {}).get("grpc_servicer_functions", []):
        module, _, func = path.rpartition(".")
        try:
            if not callable(getattr(importlib.import_module(module), func, None)):
                errors.append(f"grpc servicer function {path} does not exist")
        except ImportError as e:
            errors.append(f"grpc servicer function {path}: {e}")
    try:
        deployments = app_deployments(serve_config)
    except Exception as e:  # import error, invalid args (the app's settings reject unknown keys)
        return errors + [f"app does not build from the manifest: {type(e).__name__}: {e}"]
    if set(deployments) != set(POOL_OF_DEPLOYMENT):
        errors.append(f"deployments {sorted(deployments)} != expected {sorted(POOL_OF_DEPLOYMENT)}")
    for name, d in deployments.items():
        if "runtime_env" not in d["ray_actor_options"]:
            errors.append(f"{name}: ray_actor_options lost the app's runtime_env")
    return errors


# ---- check 4: placement through the Ray autoscaler's own view of the cluster ---------------------
def node_types(rayservice: dict) -> dict[str, dict]:
    """worker group -> {"resources": ..., "max_workers": ...}, derived by the Ray autoscaler's code."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {"metadata": {"name": "specserve", "namespace": "default"}, "spec": rayservice["spec"]["rayClusterConfig"]}
    return _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]


def replica_demand(ray_actor_options: dict) -> dict[str, float]:
    demand = {"CPU": ray_actor_options.get("num_cpus", 1), "GPU": ray_actor_options.get("num_gpus", 0)}
    demand.update(ray_actor_options.get("resources", {}))  # Serve's defaults: 1 CPU, no GPU
    return {k: v for k, v in demand.items() if v}


def fits(demand: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(capacity.get(k, 0) >= v - 1e-9 for k, v in demand.items())


def nodes_needed(demands: list[dict[str, float]], capacity: dict[str, float]) -> int:
    """First-fit decreasing bin packing: how many nodes of `capacity` hold all `demands`."""
    nodes: list[dict[str, float]] = []
    for demand in sorted(demands, key=lambda d: (d.get("GPU", 0), d.get("CPU", 0)), reverse=True):
        for free in nodes:
            if fits(demand, free):
                break
        else:
            free = dict(capacity)
            nodes.append(free)
        for k, v in demand.items():
            free[k] = free.get(k, 0) - v
    return len(nodes)


def placement_errors(rayservice: dict) -> list[str]:
    errors = []
    types = node_types(rayservice)
    per_pool: dict[str, list[dict]] = {}
    for name, deployment in app_deployments(serve_config_of(rayservice)).items():
        demand = replica_demand(deployment["ray_actor_options"])
        tags = [pool for pool in POOLS if pool in demand]
        if tags != [POOL_OF_DEPLOYMENT.get(name)]:
            errors.append(f"{name}: asks for pool tags {tags}, expected [{POOL_OF_DEPLOYMENT.get(name)}]")
            continue
        fitting = [t for t, spec in types.items() if fits(demand, spec["resources"])]
        if fitting != [tags[0]]:
            errors.append(f"{name}: one replica {demand} fits node types {fitting}, expected only [{tags[0]}]")
            continue
        per_pool.setdefault(tags[0], []).extend([demand] * deployment["max_replicas"])
    for pool, demands in per_pool.items():
        needed = nodes_needed(demands, types[pool]["resources"])
        if needed > types[pool]["max_workers"]:
            errors.append(f"pool {pool}: max replicas need {needed} nodes > maxReplicas {types[pool]['max_workers']}")
    return errors


# ---- check 5: the readiness probe is wired to what the image and Serve provide ------------------
def probe_wiring_errors(rayservice: dict, dockerfile: str) -> list[str]:
    errors = []
    grpc_port = serve_config_of(rayservice)["grpc_options"]["port"]
    installed = set(re.findall(r"^COPY\s+(?:--\S+\s+)*k8s/probes/serve_grpc_healthz\.py\s+(\S+)", dockerfile, re.M))
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        command = " ".join(container.get("readinessProbe", {}).get("exec", {}).get("command", []))
        match = re.search(r"python (\S+serve_grpc_healthz\.py) --port (\d+)", command)
        if not match:
            errors.append(f"{group['groupName']}: readiness probe does not run serve_grpc_healthz.py")
            continue
        if match.group(1) not in installed:
            errors.append(f"{group['groupName']}: probe script {match.group(1)} is not where the Dockerfile puts it {installed}")
        if int(match.group(2)) != grpc_port:
            errors.append(f"{group['groupName']}: probe port {match.group(2)} != Serve gRPC port {grpc_port}")
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if ports.get("grpc") != grpc_port:
            errors.append(f"{group['groupName']}: container port 'grpc' {ports.get('grpc')} != {grpc_port}")
    return errors


# ======== tests ===================================================================================
def test_every_manifest_parses():
    files = manifest_files()
    assert len(files) >= 8, files
    for path in files:
        assert load_docs(path), f"{path} is empty"


@needs_crd
@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_rayservice_validates_against_the_crd(target):
    assert crd_errors(rayservice_of(render(target))) == []


@needs_crd
def test_crd_check_rejects_broken_rayservice():
    good = base_rayservice()
    assert crd_errors(good) == []
    typo = copy.deepcopy(good)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["minReplicas"] = "one"
    missing = copy.deepcopy(good)
    del missing["spec"]["rayClusterConfig"]["workerGroupSpecs"][2]["groupName"]
    bad_enum = copy.deepcopy(good)
    bad_enum["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    for broken, field in [(typo, "maxReplica"), (wrong_type, "minReplicas"), (missing, "groupName"), (bad_enum, "Fast")]:
        errors = crd_errors(broken)
        assert errors and any(field in e for e in errors), errors


def test_openapi_conversion_handles_int_or_string_and_nullable():
    schema = openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
            },
        }
    )
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"port": 80, "note": None, "free": {"anything": 1}})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"port": 1.5})
    assert not validator.is_valid({"unknown": 1})


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_core_kinds_and_pod_templates_validate_strictly(target):
    objects = render(target)
    core = [o for o in objects if o["apiVersion"] in ("v1", "apps/v1")]
    assert {o["kind"] for o in core} == {"Service"}
    errors = [e for o in core for e in core_errors(o)]
    assert errors + pod_template_errors(rayservice_of(objects)) == []


def test_kubernetes_validate_rejects_broken_core_objects():
    service = load_docs(K8S / "base" / "grpc-service.yaml")[0]
    assert core_errors(service) == []
    bad_port = copy.deepcopy(service)
    bad_port["spec"]["ports"][0]["port"] = "nine-thousand"
    unknown = copy.deepcopy(service)
    unknown["spec"]["selectr"] = {"a": "b"}
    assert core_errors(bad_port) and core_errors(unknown)
    rayservice = base_rayservice()
    assert pod_template_errors(rayservice) == []
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envForm"] = []
    assert pod_template_errors(wrong_type) and pod_template_errors(typo)


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_serve_config_validates_with_ray_serve_schema(target):
    config = serve_config_of(rayservice_of(render(target)))
    assert serve_schema_errors(config) == []
    assert serve_code_errors(config) == []


def test_serve_checks_reject_broken_config():
    config = serve_config_of(base_rayservice())
    assert serve_schema_errors(config) == [] and serve_code_errors(config) == []
    no_import = copy.deepcopy(config)
    del no_import["applications"][0]["import_path"]
    zero = copy.deepcopy(config)
    zero["applications"][0]["deployments"] = [{"name": "Router", "num_replicas": 0}]
    assert serve_schema_errors(zero) and serve_schema_errors(no_import)

    def broken(change):
        c = copy.deepcopy(config)
        change(c, c["applications"][0])
        return serve_code_errors(c)

    assert broken(lambda c, app: app["args"].update(verfier={"num_cpus": 1}))  # unknown setting
    assert broken(lambda c, app: app["args"].update(drafters=["ngram"]))  # Small/MediumDrafter missing
    assert broken(lambda c, app: app.update(import_path="specserve.serve.app:no_such_app"))
    assert broken(lambda c, app: app.update(deployments=[{"name": "Verifier", "ray_actor_options": {"num_cpus": 1}}]))
    assert broken(lambda c, app: c["grpc_options"].update(grpc_servicer_functions=["specserve.v1.generation_pb2_grpc.add_Nope_to_server"]))


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_each_deployment_lands_on_its_own_pool_and_pools_hold_max_replicas(target):
    rayservice = rayservice_of(render(target))
    types = node_types(rayservice)
    assert set(types) == {"headgroup", *POOLS}
    assert types["headgroup"]["resources"].get("CPU", 0) == 0, "the head must not host replicas"
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert placement_errors(rayservice) == []


def test_placement_check_rejects_unschedulable_or_misplaced_deployments():
    rayservice = base_rayservice()
    assert placement_errors(rayservice) == []

    def with_role_change(role, change):
        broken = copy.deepcopy(rayservice)
        config = serve_config_of(broken)
        change(config["applications"][0]["args"][role])
        broken["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        return placement_errors(broken)

    assert with_role_change("verifier", lambda r: r.update(num_gpus=2))  # fits no node
    assert with_role_change("small", lambda r: r.update(resources={"verifier": 1}))  # wrong pool
    assert with_role_change("router", lambda r: r.update(resources={}))  # no pool: could land anywhere
    assert with_role_change("medium", lambda r: r["autoscaling"].update(max_replicas=40))  # pool too small


def test_readiness_probe_matches_image_and_serve_port():
    dockerfile = (REPO / "Dockerfile").read_text()
    rayservice = base_rayservice()
    assert probe_wiring_errors(rayservice, dockerfile) == []
    assert probe_wiring_errors(rayservice, dockerfile.replace("/opt/specserve/probes/", "/elsewhere/"))
    other_port = copy.deepcopy(rayservice)
    config = serve_config_of(other_port)
    config["grpc_options"]["port"] = 9100
    other_port["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert probe_wiring_errors(other_port, dockerfile)


def test_grpc_service_targets_the_serve_grpc_port_of_app_pods():
    service = load_docs(K8S / "base" / "grpc-service.yaml")[0]
    rayservice = base_rayservice()
    grpc_port = serve_config_of(rayservice)["grpc_options"]["port"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == grpc_port and port["appProtocol"] == "grpc"
    for name, template in pod_templates(rayservice).items():
        labels = template["metadata"]["labels"]
        selector = {k: v for k, v in service["spec"]["selector"].items() if k != "ray.io/serve"}  # set by KubeRay
        assert selector.items() <= labels.items(), name
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[port["targetPort"]] == grpc_port, name


@needs_kubectl
def test_overlays_differ_where_they_should():
    cpu, gpu = rayservice_of(render("overlays/cpu-dev")), rayservice_of(render("overlays/gpu"))
    for template in pod_templates(cpu).values():
        spec = template["spec"]
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
        assert spec["containers"][0]["image"].endswith("-cpu")
    gpu_templates = pod_templates(gpu)
    for pool in ("drafter", "verifier"):
        assert gpu_templates[pool]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu_templates[pool]["spec"]["nodeSelector"] == {"specserve.dev/pool": pool}
    assert all(t["spec"]["containers"][0]["image"].endswith("-cuda") for t in gpu_templates.values())


@needs_kubectl
def test_monitoring_component_composes_with_an_overlay(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes only relative paths to other kustomizations
                "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "monitoring", tmp_path)],
            }
        )
    )
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    rayservice = rayservice_of(objects)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, template in pod_templates(rayservice).items():
        assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), name
        assert endpoint["port"] in {p["name"] for p in template["spec"]["containers"][0]["ports"]}, name


@needs_kubectl
def test_kustomize_rejects_a_broken_overlay(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [os.path.relpath(K8S / "base", tmp_path)], "patches": [{"path": "missing-patch.yaml"}]})
    )
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "missing-patch.yaml" in result.stderr


# ---- the probe script ---------------------------------------------------------------------------
def run_probe(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROBE_SCRIPT), "--port", str(port), "--timeout", "3"],
        capture_output=True, text=True, timeout=60,
    )


def free_port_above(start: int) -> int:
    for port in range(start, start + 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def test_probe_script_reads_serve_healthz_status():
    """Against a stand-in proxy built from Ray's own generated RayServeAPIService stubs."""
    import grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    class FakeProxy(serve_pb2_grpc.RayServeAPIServiceServicer):
        healthy = True

        def Healthz(self, request, context):
            if not self.healthy:
                context.abort(grpc.StatusCode.UNAVAILABLE, "This node is being drained.")
            return serve_pb2.HealthzResponse(message="success")

    proxy = FakeProxy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    serve_pb2_grpc.add_RayServeAPIServiceServicer_to_server(proxy, server)
    port = free_port_above(20000)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        ready = run_probe(port)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        proxy.healthy = False
        draining = run_probe(port)
        assert draining.returncode == 1 and "drained" in draining.stdout
    finally:
        server.stop(0)
    gone = run_probe(port)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stdout


# ---- live smoke test: the manifest's Serve config on a real Ray cluster -------------------------
def smoke_serve_config(rayservice: dict, grpc_port: int, http_port: int) -> dict:
    """serveConfigV2 made to fit this machine: free ports, the cpu profile, 0.1 CPU and no GPU per
    replica, one replica of each deployment. Models, drafters and placement tags stay as written."""
    config = serve_config_of(rayservice)
    config["grpc_options"]["port"] = grpc_port
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (app,) = config["applications"]
    args = app["args"]
    args["profile"] = "cpu"
    for role in ("router", "ngram", "small", "medium", "verifier"):
        settings = args.setdefault(role, {})
        settings.pop("num_gpus", None)
        settings["num_cpus"] = 0.1
        settings["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    return config


@pytest.mark.slow
def test_smoke_serve_deploy_of_the_manifest_config(tmp_path):
    """`ray start --head` + `serve deploy` of the manifest's serveConfigV2, RUNNING on a deadline, the
    probe passes, one Generate call answers. The cluster runs in its own process group, ended by id
    (never `ray stop`, which would end every Ray cluster of this user on the machine)."""
    import grpc

    from specserve.v1 import generation_pb2, generation_pb2_grpc

    grpc_port, http_port = free_port_above(20000), free_port_above(21000)
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(smoke_serve_config(base_rayservice(), grpc_port, http_port)))
    bin_dir = Path(sys.executable).parent
    ray_port, dashboard_port = free_port_above(22000), free_port_above(23000)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    temp_dir = tempfile.mkdtemp(prefix="rk8s", dir="/tmp")  # short: Ray's unix socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2",
            "--node-ip-address", "127.0.0.1", "--port", str(ray_port), "--temp-dir", temp_dir,
            "--ray-client-server-port", str(free_port_above(24000)),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
            "--dashboard-agent-listen-port", str(free_port_above(25000)),
            "--metrics-export-port", str(free_port_above(26000)),
            "--min-worker-port", "27000", "--max-worker-port", "27999",
            # this one node plays all three pools
            "--resources", json.dumps({pool: 100 for pool in POOLS}),
            "--disable-usage-stats",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 480
        while True:  # `serve deploy` needs the dashboard's REST API up
            deploy = subprocess.run(
                [str(bin_dir / "serve"), "deploy", str(config_file), "--address", dashboard],
                env=env, capture_output=True, text=True, timeout=120,
            )
            if deploy.returncode == 0:
                break
            assert head.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, deploy.stderr
            time.sleep(2)
        status = ""
        while True:
            result = subprocess.run(
                [str(bin_dir / "serve"), "status", "--address", dashboard],
                env=env, capture_output=True, text=True, timeout=60,
            )
            status = result.stdout
            app_status = ((yaml.safe_load(status) or {}).get("applications") or {}).get("specserve", {})
            if app_status.get("status") == "RUNNING":
                break
            assert app_status.get("status") != "DEPLOY_FAILED", status
            assert time.monotonic() < deadline, f"app not RUNNING before the deadline:\n{status}"
            time.sleep(2)

        probe = run_probe(grpc_port)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            reply = stub.Generate(
                generation_pb2.GenerateRequest(text="The capital of France is", max_new_tokens=4, rule="greedy"),
                timeout=180,
            )
        assert reply.ListFields(), reply
    finally:
        end_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the group we started (ray start --block stops its node on it), then SIGKILL leftovers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
