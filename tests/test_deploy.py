"""deploy/ kept honest offline: manifests parse and validate against KubeRay's CRDs and
Kubernetes' schemas, the commands they run exist in the CLI, and versions and ports agree."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from expertmesh.cli import DEFAULT_PORT, build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayService", "RayJob"}


def objects():
    for path in MANIFESTS:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                yield path, obj


def test_there_are_manifests_for_both_variants():
    kinds = {(p.parent.name, o["kind"]) for p, o in objects()}
    for variant in ("cpu-tiny", "mixtral-8x7b-8gpu"):
        assert (variant, "RayCluster") in kinds and (variant, "Service") in kinds


def _crd_schema(kind: str, version: str) -> dict:
    plural = {"RayCluster": "rayclusters", "RayService": "rayservices", "RayJob": "rayjobs"}[kind]
    crd = yaml.safe_load((CRDS / f"ray.io_{plural}.yaml").read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _as_json_schema(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"CRD {kind} has no version {version}")


def _as_json_schema(node):
    """OpenAPI v3 structural schema -> JSON Schema: int-or-string becomes a type union, x-kubernetes
    keys are dropped."""
    if isinstance(node, dict):
        out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string"):
            out["type"] = ["integer", "string"]
            out.pop("anyOf", None)
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # structural schemas prune unknown fields: flag them
        return out
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    return node


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates(path):
    import jsonschema
    import kubernetes_validate

    for obj in yaml.safe_load_all(path.read_text()):
        if obj["kind"] in RAY_KINDS:
            if not CRDS.is_dir():
                pytest.skip(f"{CRDS} is absent: KubeRay CRD schemas not available")
            group, version = obj["apiVersion"].split("/")
            assert group == "ray.io"
            jsonschema.validate(obj, _crd_schema(obj["kind"], version))
        else:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def _containers(obj):
    spec = obj["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield group, container


def _expertmesh_commands(container) -> list[list[str]]:
    script = " ".join(container.get("args", []))
    commands = []
    for part in re.split(r"&&|;", script):
        words = shlex.split(part.strip())
        if words and words[0] == "exec":
            words = words[1:]
        if words and words[0] == "expertmesh":
            commands.append(words[1:])
    return commands


def test_commands_and_flags_exist_and_ports_agree():
    parser = build_parser()
    served = 0
    for _, obj in objects():
        if obj["kind"] != "RayCluster":
            continue
        for group, container in _containers(obj):
            for argv in _expertmesh_commands(container):
                args = parser.parse_args(argv)  # exits (fails the test) on an unknown flag
                if args.command == "serve":
                    served += 1
                    assert args.host == "0.0.0.0"
                    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                    assert ports["grpc"] == args.port == DEFAULT_PORT
                    assert ports["http"] == args.http_port  # the OpenAI-compatible API, exposed too
                    # the controller runs, within the expert group's bounds, its metrics scraped
                    experts = next(g for g in obj["spec"]["workerGroupSpecs"] if g["groupName"] == "experts")
                    assert args.autoscale
                    assert (args.min_workers, args.max_workers) == (experts["minReplicas"], experts["maxReplicas"])
                    assert args.min_workers <= args.workers <= args.max_workers
                    assert ports["em-metrics"] == args.metrics_port
                    notes = group["template"]["metadata"]["annotations"]
                    assert notes["prometheus.io/scrape"] == "true"
                    assert int(notes["prometheus.io/port"]) == args.metrics_port
                    assert container["readinessProbe"]["grpc"]["port"] == args.port
                    assert group["rayStartParams"].get("num-gpus", "0") == "0" or args.device == "cpu"
                    # the other routers have a group of their own that declares their resource
                    routers = next(g for g in obj["spec"]["workerGroupSpecs"] if g["groupName"] == "routers")
                    declared = json.loads(json.loads(routers["rayStartParams"]["resources"]))
                    assert args.router_resource in declared and routers["maxReplicas"] >= args.routers - 1 >= 1
                    assert routers["rayStartParams"].get("num-gpus", "0") == ("0" if args.device == "cpu" else "1")
            if group is obj["spec"]["headGroupSpec"]:
                assert group["rayStartParams"]["num-cpus"] == "0" and group["rayStartParams"]["num-gpus"] == "0"
            resources = container["resources"]
            assert resources["requests"] == resources["limits"]
    assert served == 2
    for path, obj in objects():
        if obj["kind"] == "Service":
            ports = {p["name"]: p["port"] for p in obj["spec"]["ports"]}
            assert ports == {"grpc": DEFAULT_PORT, "http": 8000}


def test_expert_groups_autoscale_one_gpu_per_worker():
    for path, obj in objects():
        if obj["kind"] != "RayCluster":
            continue
        assert obj["spec"]["enableInTreeAutoscaling"] is True
        assert {"upscalingMode", "idleTimeoutSeconds"} <= set(obj["spec"]["autoscalerOptions"])
        assert obj["spec"]["autoscalerOptions"]["version"] == "v2"
        experts = next(g for g in obj["spec"]["workerGroupSpecs"] if g["groupName"] == "experts")
        assert experts["minReplicas"] <= experts["maxReplicas"]
        container = experts["template"]["spec"]["containers"][0]
        if "gpu" in path.parent.name:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert experts["rayStartParams"]["num-gpus"] == "1"
            assert any(t["key"] == "nvidia.com/gpu" for t in experts["template"]["spec"]["tolerations"])


def test_ray_versions_agree():
    pinned = re.search(r'"ray\[default\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert base == pinned
    for _, obj in objects():
        if obj["kind"] == "RayCluster":
            assert obj["spec"]["rayVersion"] == pinned
            for _, container in _containers(obj):
                assert f"ray{pinned}" in container["image"]  # images pinned to the same Ray
                assert not container["image"].endswith(":latest")


def test_no_secret_values_in_manifests():
    for path in MANIFESTS:
        text = path.read_text().lower()
        assert "kind: secret" not in text, f"{path}: secrets are referenced, never written here"
        assert not re.search(r"(token|password|apikey)\s*:\s*\S+", text.replace("secretname", "")), path


def test_gateways_join_their_cluster_and_share_the_service():
    """Each variant runs a gateway Deployment of its own over the RayCluster's routers: its command
    parses, it joins that cluster's head service, its ports agree with the Service's, and the
    Service selects both its pods and the router pod (serve's own door)."""
    parser = build_parser()
    for variant in ("cpu-tiny", "mixtral-8x7b-8gpu"):
        found = {o["kind"]: o for p, o in objects() if p.parent.name == variant}
        cluster, service, gateway = found["RayCluster"], found["Service"], found["Deployment"]
        pod = gateway["spec"]["template"]
        container = pod["spec"]["containers"][0]
        [argv] = _expertmesh_commands(container)
        args = parser.parse_args(argv)
        assert args.command == "gateway" and args.host == "0.0.0.0"
        assert args.cluster == f"{cluster['metadata']['name']}-head-svc:6379"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert (ports["grpc"], ports["http"], ports["em-metrics"]) == (args.port, args.http_port, args.metrics_port)
        assert container["readinessProbe"]["grpc"]["port"] == args.port
        assert gateway["spec"]["replicas"] >= 2
        assert container["image"] == cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        selector = service["spec"]["selector"].items()
        router = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "router")
        assert selector <= pod["metadata"]["labels"].items()
        assert selector <= router["template"]["metadata"]["labels"].items()
        serve = parser.parse_args(_expertmesh_commands(router["template"]["spec"]["containers"][0])[-1])
        assert (serve.auth_token_file is None) == (args.auth_token_file is None)  # one token for every door
