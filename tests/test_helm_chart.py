"""The KubeRay Helm chart (helm/k2ray): rendered and linted with the real Helm engine (helm-python-sdk, offline).

Checks, for each values file and for the optional objects on and off:
- `helm lint` reports no errors or warnings;
- serveConfigV2 passes Ray Serve's ServeDeploySchema and its args pass k2ray.config.ServeArgs; with the default
  values it is the application of deploy/config.yaml;
- pod templates, Services, Secrets, ConfigMaps and Ingresses pass the Kubernetes JSON schemas (kubernetes-validate,
  strict: unknown fields fail); the RayService and the Prometheus Operator objects pass structural schemas of the
  KubeRay v1 / monitoring.coreos.com v1 fields the chart uses;
- the placement plan (worker groups x pools) can hold the layout in the args, and impossible plans fail to render;
- values.schema.json rejects bad values and stays in step with ServeArgs;
- the chart's dashboard copy equals dashboards/k2ray.json.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from k2ray.config import ModelArgs, ParallelConfig
from k2ray.serve.config import ServeArgs

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "k2ray"
RELEASE = "k2ray"
NAMESPACE = "llm"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.26.0", kubernetes_validate.latest_version() + ".0")

KIMI_VALUES = yaml.safe_load((CHART / "values-kimi-k2-thinking.yaml").read_text())


def _commented_override(path: Path, heading: str) -> dict:
    """The YAML block commented out under `heading` in a values file (documented variants are rendered too)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if heading in line)
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    first = next(i for i, line in enumerate(block) if re.fullmatch(r"[A-Za-z]\w*:", line))
    return yaml.safe_load("\n".join(block[first:]))


KIMI_2X8_H100 = _commented_override(CHART / "values-kimi-k2-thinking.yaml", "Two nodes of 8x H100")


def merged(*layers: dict) -> dict:
    """Deep-merge value layers the way `helm -f a -f b` does (maps merge, everything else is replaced)."""
    out: dict = {}
    for layer in layers:
        out = _merge(out, layer)
    return out


def _merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        res = dict(base)
        for k, v in over.items():
            res[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return res
    return copy.deepcopy(over)


FEATURES = {
    "apiKeys": {"keys": ["sk-test-1", "sk-test-2"]},
    "service": {"enabled": True, "type": "LoadBalancer", "port": 80, "annotations": {"team": "llm"},
                "loadBalancerSourceRanges": ["10.0.0.0/8"]},
    "ingress": {"enabled": True, "className": "nginx", "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
                "hosts": [{"host": "k2ray.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}],
                "tls": [{"hosts": ["k2ray.example.com"], "secretName": "k2ray-tls"}]},
    "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                   "serviceMonitor": {"enabled": True}},
    "grafana": {"dashboard": {"enabled": True, "folder": "LLM"}},
    "autoscaling": {"enabled": True, "version": "v2", "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}}},
    "rayClusterDeletionDelaySeconds": 120,
    "extraEnv": [{"name": "RAY_SERVE_LOG_TO_STDERR", "value": "1"}],
    "serve": {"loggingConfig": {"encoding": "JSON", "log_level": "INFO"},
              "runtimeEnv": {"env_vars": {"K2RAY_PROGRESS": "0"}}},
}
PVC_MODEL = {"model": {"source": "pvc", "pvc": {"claimName": "weights", "subPath": "hf"}},
             "serve": {"args": {"model": "/models/k2ray-demo"}}}
HOSTPATH_MODEL = {"model": {"source": "hostPath", "mountPath": "/mnt/models", "hostPath": {"path": "/data/models"}},
                  "serve": {"args": {"model": "/mnt/models/k2ray-demo"}}}
DOWNLOAD_MODEL = {"model": {"source": "download", "download": {
    "image": "object-store-client:1", "command": ["sh", "-c", "fetch-model \"$K2RAY_MODEL_DIR\""],
    "envFrom": [{"secretRef": {"name": "object-store-credentials"}}], "sizeLimit": "20Gi"}},
    "serve": {"args": {"model": "/models/k2ray-demo"}}}

CASES = {
    "default": {},
    "default+features": FEATURES,
    "default+pvc": PVC_MODEL,
    "default+hostPath": HOSTPATH_MODEL,
    "default+download+existingSecret": merged(DOWNLOAD_MODEL, {"apiKeys": {"existingSecret": "my-keys"}}),
    "kimi": KIMI_VALUES,
    "kimi+features": merged(KIMI_VALUES, FEATURES),
    "kimi-2x8-h100": merged(KIMI_VALUES, KIMI_2X8_H100),
}


# ---------------------------------------------------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


_CACHE: dict[str, dict] = {}


def render(chart, values: dict) -> dict:
    """Template path -> rendered text (Helm's own engine, no cluster)."""
    return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(chart, values: dict) -> list[dict]:
    out = []
    for path, text in sorted(render(chart, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def case_objects(chart, case: str) -> list[dict]:
    if case not in _CACHE:
        _CACHE[case] = objects(chart, CASES[case])
    return copy.deepcopy(_CACHE[case])


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rayservice(objs) -> dict:
    return one(objs, "RayService")


def serve_config(objs) -> dict:
    return yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])


def pod_templates(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for g in cluster.get("workerGroupSpecs", []):
        out[g["groupName"]] = g["template"]
    return out


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def group_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources", "{}")
    return json.loads(raw.strip("'\" "))


# ---------------------------------------------------------------------------------------------------------------------
# Structural schemas of the custom resources (the fields of KubeRay v1 and Prometheus Operator v1 this chart writes)
# ---------------------------------------------------------------------------------------------------------------------

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"],
         "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 47},
                        "namespace": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP},
         "additionalProperties": False}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {
    "metadata": {"type": "object"},
    "spec": {"type": "object", "required": ["containers"],
             "properties": {"containers": {"type": "array", "minItems": 1}}}}}
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string", "minLength": 1},
                "upgradeStrategy": {"type": "object", "additionalProperties": False, "properties": {
                    "type": {"enum": ["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]},
                    "clusterUpgradeOptions": {"type": "object", "additionalProperties": False, "properties": {
                        "maxSurgePercent": _INT32, "stepSizePercent": _INT32, "intervalSeconds": _INT32,
                        "gatewayClassName": {"type": "string"}}}}},
                "rayClusterDeletionDelaySeconds": _INT32,
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "serveService": {"type": "object"},  # a core Service: validated with kubernetes-validate
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
                            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                            "idleTimeoutSeconds": _INT32,
                            "version": {"enum": ["v1", "v2"]},
                            "resources": {"type": "object"}}},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "rayStartParams": _STR_MAP,
                                "template": _POD_TEMPLATE}},
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object",
                            "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
                                "idleTimeoutSeconds": _INT32,
                                "labels": _STR_MAP,
                                "rayStartParams": _STR_MAP,
                                "template": _POD_TEMPLATE}}},
                    },
                },
            },
        },
    },
}
_MONITOR_ENDPOINT = {"type": "object", "required": ["port"], "additionalProperties": False, "properties": {
    "port": {"type": "string"}, "path": {"type": "string"},
    "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
    "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}
_MONITOR_SPEC = {"selector": {"type": "object", "required": ["matchLabels"],
                              "properties": {"matchLabels": _STR_MAP}, "additionalProperties": False},
                 "podTargetLabels": {"type": "array", "items": {"type": "string"}}}
PODMONITOR_SCHEMA = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": _META,
    "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
             "properties": dict(_MONITOR_SPEC, podMetricsEndpoints={"type": "array", "minItems": 1,
                                                                     "items": _MONITOR_ENDPOINT})}}}
SERVICEMONITOR_SCHEMA = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"}, "metadata": _META,
    "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
             "properties": dict(_MONITOR_SPEC, endpoints={"type": "array", "minItems": 1,
                                                           "items": _MONITOR_ENDPOINT})}}}
CUSTOM_SCHEMAS = {"RayService": RAYSERVICE_SCHEMA, "PodMonitor": PODMONITOR_SCHEMA,
                  "ServiceMonitor": SERVICEMONITOR_SCHEMA}


def kube_validate(obj: dict, what: str) -> None:
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            first = str(e).splitlines()[0]
            pytest.fail(f"{what} is not a valid {obj.get('kind')} for Kubernetes {version}: {first} "
                        f"at {list(getattr(e.caused_by, 'absolute_path', []))}")


def serve_validate(cfg: dict) -> None:
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(cfg)
    for app in cfg["applications"]:
        ServeArgs.model_validate(app["args"])


# ---------------------------------------------------------------------------------------------------------------------
# Lint and validation of every rendered object
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_clean(case):
    report = helm.lint(CHART, copy.deepcopy(CASES[case]), strict=True, namespace=NAMESPACE)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and bad == [], report


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_objects_validate(chart, case):
    objs = case_objects(chart, case)
    assert objs, "nothing rendered"
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, name
        if obj["kind"] in CUSTOM_SCHEMAS:
            jsonschema.validate(obj, CUSTOM_SCHEMAS[obj["kind"]])
        else:
            kube_validate(obj, name)

    rs = rayservice(objs)
    # Every Ray pod template is a valid core PodTemplateSpec.
    for group, template in pod_templates(rs).items():
        kube_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{group}-template"},
                       "template": template}, f"pod template of group {group}")
    if "serveService" in rs["spec"]:
        svc = dict(rs["spec"]["serveService"], apiVersion="v1", kind="Service")
        kube_validate(svc, "spec.serveService")
    # serveConfigV2 is a Ray Serve config whose args are k2ray's.
    serve_validate(serve_config(objs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_cluster_structure(chart, case):
    rs = rayservice(case_objects(chart, case))
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    # The head takes no GPU work and no GPUs.
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_c = ray_container(head["template"])
    for section in ("limits", "requests"):
        assert not any("gpu" in k for k in head_c.get("resources", {}).get(section, {})), head_c["resources"]
    # KubeRay derives the Serve Service from the head container's port named "serve".
    ports = {p["name"]: p["containerPort"] for p in head_c["ports"]}
    assert ports["serve"] == serve_config([rs])["http_options"]["port"]
    assert {"gcs-server", "dashboard", "client", "metrics"} <= set(ports)

    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        c = ray_container(g["template"])
        assert c["name"] == "ray-worker"
        gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        assert int(g["rayStartParams"]["num-gpus"]) == gpus
        assert int(c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu", 0)) == gpus
        assert any(p["name"] == "metrics" for p in c["ports"])
        # NCCL / object store shared memory.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def _cpus(quantity) -> float:
    """`ray start --num-cpus` as KubeRay derives it from the container's CPU limit (rounded up)."""
    q = str(quantity)
    return float(-(-int(q[:-1]) // 1000)) if q.endswith("m") else float(int(-(-float(q) // 1)))


def _bundles(p: ParallelConfig) -> list[dict[str, float]]:
    return p.bundles()


def _ray_nodes(rs: dict) -> list[dict[str, float]]:
    """The Ray nodes the rendered cluster offers (at its largest size) with their Ray resources."""
    cluster = rs["spec"]["rayClusterConfig"]
    nodes = []
    for g in cluster["workerGroupSpecs"]:
        params = g["rayStartParams"]
        c = ray_container(g["template"])
        cpus = float(params["num-cpus"]) if "num-cpus" in params else _cpus(c["resources"]["limits"]["cpu"])
        node = {"CPU": cpus, "GPU": float(params["num-gpus"]), **group_resources(g)}
        pods = g["maxReplicas"] if cluster["enableInTreeAutoscaling"] else g["replicas"]
        nodes += [dict(node) for _ in range(pods)]
    return nodes


def _place(demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[int]:
    """First-fit decreasing; returns the node index of each demand (a feasible placement, or AssertionError)."""
    where = [-1] * len(demands)
    order = sorted(range(len(demands)), key=lambda i: (-demands[i].get("GPU", 0), -sum(demands[i].values())))
    for i in order:
        for n, free in enumerate(nodes):
            if all(free.get(k, 0) + 1e-9 >= v for k, v in demands[i].items()):
                for k, v in demands[i].items():
                    free[k] -= v
                where[i] = n
                break
        else:
            raise AssertionError(f"no Ray node can hold {demands[i]}; free: {nodes}")
    return where


@pytest.mark.parametrize("case", sorted(CASES))
def test_placement_plan_fits(chart, case):
    """The Ray nodes the chart creates can hold every model group's placement-group bundles (the pools' resources
    included), the routers and the ingress replicas, at their maximum replica counts."""
    objs = case_objects(chart, case)
    rs = rayservice(objs)
    app = serve_config(objs)["applications"][0]
    args = ServeArgs.model_validate(app["args"])
    p = args.parallel
    deps = {d["name"]: d for d in app["deployments"]}

    def replicas(d):
        return d.get("num_replicas") or d["autoscaling_config"]["max_replicas"]

    def actor(d):
        opts = d.get("ray_actor_options", {})
        return {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}

    # Each model group's placement group: bundle 0 for the K2Router replica itself, then one per actor.
    router = {"CPU": args.router_cpus, "GPU": args.router_gpus}
    # Serve schedules the replica into bundle 0, so its own resources must fit there.
    own = actor(deps["K2Router"])
    assert own["CPU"] <= router["CPU"] and own["GPU"] <= router["GPU"], (own, router)
    bundles = [b for _ in range(replicas(deps["K2Router"])) for b in _bundles(p)]
    others = [router] * replicas(deps["K2Router"])
    others += [actor(deps["OpenAIIngress"])] * replicas(deps["OpenAIIngress"])
    nodes = _ray_nodes(rs)
    where = _place(bundles + others, nodes)
    if p.device == "cuda":
        assert all(b.get("GPU", 0) > 0 for b in bundles)
    # Pools pinned by custom resources land only on the pods that host that pool.
    for b, n in zip(bundles, where):
        for k in b:
            if k.startswith("k2ray_"):
                assert _ray_nodes(rs)[n].get(k, 0) > 0


# ---------------------------------------------------------------------------------------------------------------------
# One source of truth: the chart's Serve application is the deploy file's
# ---------------------------------------------------------------------------------------------------------------------


def _compare_with_deploy_file(rendered: dict, deploy: dict) -> None:
    assert [a["name"] for a in rendered["applications"]] == [a["name"] for a in deploy["applications"]]
    for got, want in zip(rendered["applications"], deploy["applications"]):
        assert got["import_path"] == want["import_path"]
        assert got["route_prefix"] == want.get("route_prefix", "/")
        assert got["args"] == want["args"]
        assert ServeArgs.model_validate(got["args"]) == ServeArgs.model_validate(want["args"])
        assert {d["name"]: d for d in got["deployments"]} == {d["name"]: d for d in want["deployments"]}
        assert got == want
    # the same proxy options, but inside a pod the proxy listens on all interfaces (the deploy file may bind loopback)
    assert {k: v for k, v in rendered["http_options"].items() if k != "host"} == \
        {k: v for k, v in deploy["http_options"].items() if k != "host"}
    assert rendered["http_options"]["host"] == "0.0.0.0"
    assert rendered["proxy_location"] == deploy["proxy_location"]


def test_default_serve_config_is_deploy_config(chart):
    deploy = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    _compare_with_deploy_file(serve_config(case_objects(chart, "default")), deploy)


def test_http_options_keep_the_pod_bind(chart):
    """serve.httpOptions (the deploy files' proxy timeouts) render into http_options, but the proxy always listens on
    all of the pod's interfaces at serve.port: KubeRay's Service targets the pod IP."""
    http = serve_config(case_objects(chart, "default"))["http_options"]
    assert http["host"] == "0.0.0.0" and http["port"] == 8000 and http["keep_alive_timeout_s"] >= 1
    for bad in ({"host": "127.0.0.1"}, {"port": 9000}, {"keep_alive_timeout_s": 0}):
        with pytest.raises(helm.HelmValuesError):
            render(chart, {"serve": {"httpOptions": bad}})


def test_kimi_serve_config_matches_deploy_file_when_present(chart):
    """deploy/kimi-k2-thinking.yaml (when it exists) and the chart's K2-Thinking values start the same application."""
    rendered = serve_config(case_objects(chart, "kimi"))
    serve_validate(rendered)
    path = ROOT / "deploy" / "kimi-k2-thinking.yaml"
    if path.exists():
        _compare_with_deploy_file(rendered, yaml.safe_load(path.read_text()))


# ---------------------------------------------------------------------------------------------------------------------
# The K2-Thinking layout and its memory sizing
# ---------------------------------------------------------------------------------------------------------------------

K2_THINKING = dict(
    model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64, n_routed_experts=384, n_shared_experts=1,
    num_experts_per_tok=8, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.827,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    max_position_embeddings=262144, rope_theta=50000.0,
)
H200_BYTES = 139 * 2**30  # usable memory per GPU


def test_kimi_two_node_variant():
    """The documented 2x8 H100 variant: the attention group hosts the attention pool and a third of the experts."""
    assert KIMI_2X8_H100["serve"]["args"]["parallel"] == {"attention_workers": 4, "expert_shards": 12}
    values = merged(KIMI_VALUES, KIMI_2X8_H100)
    groups = {k: g for k, g in values["workerGroups"].items() if g["enabled"]}
    assert {k: g["pools"] for k, g in groups.items()} == {"attention": {"attention": 4, "experts": 4},
                                                            "experts": {"attention": 0, "experts": 8}}
    m = ModelArgs.from_dict(K2_THINKING)
    e = ServeArgs.model_validate(values["serve"]["args"]).engine
    h100 = 78 * 2**30
    assert 571e9 / 12 < 0.75 * h100 and 23.5e9 + e.kv_cache_memory_gb * 2**30 < 0.9 * h100
    assert e.kv_blocks_for(m) * e.block_size >= e.max_model_len


def test_kimi_layout_and_memory_sizing(chart):
    objs = case_objects(chart, "kimi")
    rs = rayservice(objs)
    args = ServeArgs.model_validate(serve_config(objs)["applications"][0]["args"])
    p, e = args.parallel, args.engine
    assert (p.executor, p.device, p.attention_workers, p.expert_shards, p.gpus_per_worker) == ("ray", "cuda", 2, 6, 1)
    assert p.collective_backend == "nccl" and e.dtype == "bfloat16"
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["h200"]
    assert sum(int(ray_container(g["template"])["resources"]["limits"]["nvidia.com/gpu"]) for g in groups) == 8
    assert group_resources(groups[0]) == {"k2ray_attention": 2, "k2ray_experts": 6}
    spec = groups[0]["template"]["spec"]
    assert spec["tolerations"] and spec["nodeSelector"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["kimi-k2-thinking"]

    m = ModelArgs.from_dict(K2_THINKING)
    # KV latent per token: (512 + 64) x 2 B x 61 layers = 70.3 KB.
    kv_per_token = m.kv_cache_dim * 2 * m.num_hidden_layers
    assert kv_per_token == 70272
    # Routed experts, INT4 + one bf16 scale per 32 weights: ~571 GB; per shard well inside one GPU.
    expert_bytes = len(m.moe_layers) * m.n_routed_experts * 3 * m.hidden_size * m.moe_intermediate_size * (0.5 + 2 / 32)
    assert 565e9 < expert_bytes < 575e9
    assert expert_bytes / p.expert_shards < 0.75 * H200_BYTES
    # Attention workers: ~23 GB of bf16 non-expert weights + the KV cache leave room for activations.
    non_expert_bytes = 23.5e9
    assert non_expert_bytes + e.kv_cache_memory_gb * 2**30 < 0.9 * H200_BYTES
    # At least one full-length context fits in one attention worker's cache.
    assert e.kv_blocks_for(m) * e.block_size >= e.max_model_len


# ---------------------------------------------------------------------------------------------------------------------
# Optional objects, API keys and model sources
# ---------------------------------------------------------------------------------------------------------------------


def test_default_renders_the_rayservice_and_the_edge(chart):
    assert sorted(o["kind"] for o in case_objects(chart, "default")) == ["ConfigMap", "RayService"]
    assert [o["kind"] for o in objects(chart, {"edge": {"enabled": False}})] == ["RayService"]


def test_optional_objects(chart):
    objs = case_objects(chart, "default+features")
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "ConfigMap", "Ingress", "PodMonitor", "RayService", "Secret", "Service",
                     "ServiceMonitor"]
    rs = rayservice(objs)
    svc = rs["spec"]["serveService"]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 80, "targetPort": "edge", "protocol": "TCP"}]
    ing = one(objs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": svc["metadata"]["name"], "port": {"number": 80}}
    # Without our Service the Ingress targets the one KubeRay names <rayservice>-serve-svc.
    plain = objects(chart, {"ingress": {"enabled": True}})
    backend = one(plain, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{rayservice(plain)['metadata']['name']}-serve-svc", "port": {"number": 8000}}

    # Monitors select the Ray pods (every pod template carries the selector labels) on the metrics port.
    pm = one(objs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    for template in pod_templates(rs).values():
        labels = template["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    metrics_svc = next(o for o in objs if o["kind"] == "Service")
    assert metrics_svc["spec"]["clusterIP"] == "None"
    sm = one(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    assert metrics_svc["spec"]["ports"][0]["name"] == sm["spec"]["endpoints"][0]["port"] == "metrics"

    # Autoscaling options reach KubeRay.
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] == 120
    assert serve_config(objs)["applications"][0]["runtime_env"] == {
        "env_vars": {"K2RAY_PROGRESS": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}}  # the edge's direct ingress


def test_grafana_dashboard_configmap(chart):
    cm = next(o for o in case_objects(chart, "default+features")
              if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"])
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "LLM"
    chart_copy = json.loads((CHART / "dashboards" / "k2ray.json").read_text())
    assert json.loads(cm["data"]["k2ray.json"]) == chart_copy


def _edge_configmap(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-edge"))


def test_edge_sidecar_fronts_every_serve_proxy(chart):
    """Every Ray pod (each may run a Serve proxy) has the nginx edge beside it, filled in from the same template as
    `k2ray edge`, with the limits `k2ray edge deploy/config.yaml` would use; the OpenAI Service targets the edge."""
    from k2ray import edge

    objs = case_objects(chart, "default")
    rs = rayservice(objs)
    svc = rs["spec"]["serveService"]
    assert svc["metadata"]["name"] == f"{rs['metadata']['name']}-serve-svc"  # the name KubeRay would give it
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": "edge", "protocol": "TCP"}]
    template = _edge_configmap(objs)["data"]["k2ray-edge.conf.template"]
    assert template == edge.TEMPLATE.read_text()
    expected = edge.settings_from_deploy(ROOT / "deploy" / "config.yaml", listen="8001",
                                         max_body="16m").environment()
    assert expected["K2RAY_EDGE_SERVERS"] == (  # the pod's ingress replicas, then its own proxy
        "server 127.0.0.1:30000 max_fails=1 fail_timeout=30s; server 127.0.0.1:30001 max_fails=1 fail_timeout=30s; "
        "server 127.0.0.1:30002 max_fails=1 fail_timeout=30s; server 127.0.0.1:30003 max_fails=1 fail_timeout=30s; "
        "server 127.0.0.1:8000 backup;")
    for name, pod in pod_templates(rs).items():
        containers = pod["spec"]["containers"]
        assert containers[0]["name"].startswith("ray-"), name  # KubeRay runs `ray start` in the first container
        side = next(c for c in containers if c["name"] == "edge")
        env = {e["name"]: e["value"] for e in side["env"]}
        assert env.pop("NGINX_ENVSUBST_FILTER") == "^K2RAY_EDGE_"
        assert env == expected, name
        assert side["ports"] == [{"name": "edge", "containerPort": 8001}]
        mounts = {m["mountPath"]: m["name"] for m in side["volumeMounts"]}
        assert mounts == {"/etc/nginx/templates": "edge-template", "/etc/nginx/conf.d": "edge-conf"}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["edge-template"]["configMap"]["name"] == _edge_configmap(objs)["metadata"]["name"]
        edge.fill(template, env)  # every variable the template uses is set
    # An explicit cap wins; the K2-Thinking values compute theirs from their own args.
    capped = rayservice(objects(chart, {"edge": {"maxRequests": 500}}))
    side = next(c for c in pod_templates(capped)["head"]["spec"]["containers"] if c["name"] == "edge")
    assert {e["name"]: e["value"] for e in side["env"]}["K2RAY_EDGE_MAX_REQUESTS"] == "500"
    # Off: no sidecar, no ConfigMap, no direct ingress, and KubeRay's own Service on the proxy port.
    off_objs = objects(chart, {"edge": {"enabled": False}})
    off = rayservice(off_objs)
    assert "serveService" not in off["spec"]
    assert "runtime_env" not in serve_config(off_objs)["applications"][0]
    for pod in pod_templates(off).values():
        assert [c["name"] for c in pod["spec"]["containers"]] == [pod["spec"]["containers"][0]["name"]]


def test_edge_template_copy_in_sync():
    """Helm cannot read files outside the chart, so the chart keeps a copy of the edge template."""
    chart_copy = CHART / "files" / "edge-nginx.conf.template"
    source = ROOT / "k2ray" / "assets" / "edge" / "nginx.conf.template"
    assert chart_copy.read_bytes() == source.read_bytes(), (
        "helm/k2ray/files/edge-nginx.conf.template differs from k2ray/assets/edge/nginx.conf.template: "
        "cp k2ray/assets/edge/nginx.conf.template helm/k2ray/files/edge-nginx.conf.template")


def test_dashboard_copy_in_sync():
    """Helm cannot read files outside the chart, so the chart keeps a copy of dashboards/k2ray.json."""
    chart_copy = CHART / "dashboards" / "k2ray.json"
    json.loads(chart_copy.read_text())
    source = ROOT / "dashboards" / "k2ray.json"
    if source.exists():
        assert chart_copy.read_bytes() == source.read_bytes(), (
            "helm/k2ray/dashboards/k2ray.json differs from dashboards/k2ray.json: "
            "cp dashboards/k2ray.json helm/k2ray/dashboards/k2ray.json")


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_api_keys_from_a_secret(chart):
    objs = case_objects(chart, "default+features")
    secret = one(objs, "Secret")
    assert secret["stringData"] == {"api-keys": "sk-test-1,sk-test-2"}
    rs = rayservice(objs)
    for group, template in pod_templates(rs).items():
        ref = _env(ray_container(template))["K2RAY_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-keys"}, group
    # The keys never appear in the RayService itself.
    assert "sk-test" not in yaml.safe_dump(rs)

    objs = case_objects(chart, "default+download+existingSecret")
    assert not [o for o in objs if o["kind"] == "Secret"]
    for template in pod_templates(rayservice(objs)).values():
        assert _env(ray_container(template))["K2RAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "my-keys"
    # No keys configured: no variable.
    for template in pod_templates(rayservice(case_objects(chart, "default"))).values():
        assert "K2RAY_API_KEYS" not in _env(ray_container(template))


def _model_volume(template: dict) -> dict | None:
    return next((v for v in template["spec"]["volumes"] if v["name"] == "model"), None)


def test_model_sources(chart):
    # builtin: nothing mounted.
    for template in pod_templates(rayservice(case_objects(chart, "default"))).values():
        assert _model_volume(template) is None

    rs = rayservice(case_objects(chart, "default+pvc"))
    templates = pod_templates(rs)
    assert _model_volume(templates.pop("head")) is None  # the head runs no replicas
    for template in templates.values():
        assert _model_volume(template)["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
        mount = next(m for m in ray_container(template)["volumeMounts"] if m["name"] == "model")
        assert mount == {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": "hf"}

    templates = pod_templates(rayservice(case_objects(chart, "default+hostPath")))
    templates.pop("head")
    for template in templates.values():
        assert _model_volume(template)["hostPath"] == {"path": "/data/models", "type": "Directory"}

    templates = pod_templates(rayservice(case_objects(chart, "default+download+existingSecret")))
    assert "initContainers" not in templates.pop("head")["spec"]
    for template in templates.values():
        assert _model_volume(template)["emptyDir"] == {"sizeLimit": "20Gi"}
        (init,) = template["spec"]["initContainers"]
        assert _env(init)["K2RAY_MODEL_DIR"]["value"] == "/models/k2ray-demo"
        assert init["envFrom"] == [{"secretRef": {"name": "object-store-credentials"}}]
        assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]

    # mountOnHead for a shared volume.
    rs = rayservice(objects(chart, merged(PVC_MODEL, {"model": {"mountOnHead": True}})))
    assert _model_volume(pod_templates(rs)["head"])["persistentVolumeClaim"]["claimName"] == "weights"


def test_notes(chart):
    notes = render(chart, {})["k2ray/templates/NOTES.txt"]
    assert f"port-forward svc/{RELEASE}-serve-svc 8000:8000" in notes
    assert '"model": "k2ray-demo"' in notes and "/v1/chat/completions" in notes
    assert f"svc/{RELEASE}-head-svc 8265:8265" in notes
    assert "Authorization" not in notes
    notes = render(chart, FEATURES)["k2ray/templates/NOTES.txt"]
    assert f"port-forward svc/{RELEASE}-openai 8000:80" in notes
    assert "Authorization: Bearer" in notes and "dashboard" in notes


# ---------------------------------------------------------------------------------------------------------------------
# Impossible placement plans fail at render time with a message naming the shortfall
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"serve": {"args": {"parallel": {"expert_shards": 16}}}},
     "parallel.expert_shards=16 x 1 model group(s) (K2Router replicas) needs 16 experts slots, but the enabled "
     "workerGroups provide 2"),
    ({"serve": {"deployments": {"K2Router": {"autoscaling_config": {"max_replicas": 2}}}}},
     "needs 2 attention slots, but the enabled workerGroups provide 1"),
    ({"workerGroups": {"experts": {"enabled": False}}}, "needs 2 experts slots, but the enabled workerGroups provide 0"),
    ({"serve": {"args": {"parallel": {"elastic": {"expert_shards": {"max": 3}}}}}},
     "parallel.expert_shards=3 x 1 model group(s) (K2Router replicas) needs 3 experts slots"),  # at its elastic max
    (merged(KIMI_VALUES, {"workerGroups": {"h200": {"gpus": 4}}}),
     "workerGroups.h200: pools attention=2 + experts=6 need 8 GPUs per pod at 1 GPU(s) per actor, but gpus=4"),
    (merged(KIMI_VALUES, {"serve": {"args": {"parallel": {"expert_pool": {"gpus": 2}}}}}),
     "need 14 GPUs per pod"),
    ({"serve": {"args": {"parallel": {"expert_pool": {"resources": {"k2ray_experts": 2}}}}}},
     "need 4 of Ray resource k2ray_experts for 1 model group(s), but the enabled workerGroups advertise 2"),
    ({"serve": {"args": {"parallel": {"attention_pool": {"resources": {"fast_nic": 1}}}}}},
     "need 1 of Ray resource fast_nic"),
    ({"serve": {"args": {"parallel": {"attention_pool": {"node_labels": {"k2ray.io/pool": "attention"}}}}}},
     "parallel.attention_pool.node_labels wants k2ray.io/pool=attention, but worker group attention hosts"),
    ({"workerGroups": {"attention": {"replicas": 3}}}, "workerGroups.attention: replicas=3 must lie within"),
    (merged(PVC_MODEL, {"serve": {"args": {"model": "/weights/k2"}}}), "serve.args.model=/weights/k2 is not under"),
])
def test_impossible_plan_fails(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=None) as err:
        render(chart, values)
    assert message in str(err.value)


def test_pool_resources_and_labels_render(chart):
    """A plan that pins pools by custom resources and Ray node labels renders, and the pods advertise them."""
    values = {"serve": {"args": {"parallel": {
        "attention_pool": {"resources": {"k2ray_attention": 1}, "node_labels": {"k2ray.io/pool": "attention"}},
        "expert_pool": {"resources": {"k2ray_experts": 1, "fast_nic": 1}}}}},
        "workerGroups": {"attention": {"rayLabels": {"k2ray.io/pool": "attention"}},
                         "experts": {"rayResources": {"fast_nic": 2}}}}
    rs = rayservice(objects(chart, values))
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["attention"]["labels"] == {"k2ray.io/pool": "attention"}
    assert group_resources(groups["attention"]) == {"k2ray_attention": 1}
    assert group_resources(groups["experts"]) == {"k2ray_experts": 2, "fast_nic": 2}
    jsonschema.validate(rs, RAYSERVICE_SCHEMA)


def test_autoscaled_plan_counts_max_replicas(chart):
    values = {"autoscaling": {"enabled": True},
              "serve": {"deployments": {"K2Router": {"autoscaling_config": {"max_replicas": 2}}}},
              "workerGroups": {"attention": {"maxReplicas": 2}, "experts": {"maxReplicas": 2}}}
    rs = rayservice(objects(chart, values))
    assert [g["maxReplicas"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == [2, 2]


# ---------------------------------------------------------------------------------------------------------------------
# values.schema.json
# ---------------------------------------------------------------------------------------------------------------------

BAD_VALUES = {
    "negative GPU count": ({"workerGroups": {"attention": {"gpus": -1}}}, "/workerGroups/attention/gpus"),
    "missing model source": ({"model": {"source": None}}, "/model"),
    "pvc without a claim": ({"model": {"source": "pvc"}, "serve": {"args": {"model": "/models/x"}}},
                            "/model/pvc/claimName"),
    "hostPath without a path": ({"model": {"source": "hostPath"}, "serve": {"args": {"model": "/models/x"}}},
                                "/model/hostPath/path"),
    "download without an image": ({"model": {"source": "download", "download": {"command": ["true"]}},
                                   "serve": {"args": {"model": "/models/x"}}}, "/model/download/image"),
    "builtin source with a path": ({"serve": {"args": {"model": "/models/x"}}}, "/serve/args/model"),
    "mounted source with a built-in name": ({"model": {"source": "pvc", "pvc": {"claimName": "w"}}},
                                            "/serve/args/model"),
    "zero attention workers": ({"serve": {"args": {"parallel": {"attention_workers": 0}}}},
                               "/serve/args/parallel/attention_workers"),
    "typo in args": ({"serve": {"args": {"parallel": {"expert_shard": 4}}}}, "/serve/args/parallel"),
    "unknown device": ({"serve": {"args": {"parallel": {"device": "tpu"}}}}, "/serve/args/parallel/device"),
    "cuda without GPUs per worker": ({"serve": {"args": {"parallel": {"device": "cuda"}}}},
                                     "/serve/args/parallel"),
    "nccl on cpu": ({"serve": {"args": {"parallel": {"backend": "nccl"}}}}, "/serve/args/parallel/device"),
    "negative KV cache": ({"serve": {"args": {"engine": {"kv_cache_memory_gb": -1}}}},
                          "/serve/args/engine/kv_cache_memory_gb"),
    "unknown dtype": ({"serve": {"args": {"engine": {"dtype": "int8"}}}}, "/serve/args/engine/dtype"),
    "negative eplb slots": ({"serve": {"args": {"parallel": {"eplb": {"redundant_slots_per_shard": -1}}}}},
                            "/serve/args/parallel/eplb/redundant_slots_per_shard"),
    "bad upgrade strategy": ({"upgradeStrategy": {"type": "Rolling"}}, "/upgradeStrategy/type"),
    "empty image repository": ({"image": {"repository": ""}}, "/image/repository"),
    "custom resources through rayStartParams": (
        {"workerGroups": {"experts": {"rayStartParams": {"resources": "{}"}}}}, "/workerGroups/experts/rayStartParams"),
    "bad worker group name": ({"workerGroups": {"GPU_pool": {"enabled": False}}}, "/workerGroups"),
    "negative pool size": ({"workerGroups": {"experts": {"pools": {"experts": -2}}}},
                           "/workerGroups/experts/pools/experts"),
    "unknown top-level key": ({"workergroups": {}}, "workergroups"),
    "ingress without hosts": ({"ingress": {"enabled": True, "hosts": []}}, "/ingress/hosts"),
    "bad scrape interval": ({"monitoring": {"interval": "often"}}, "/monitoring/interval"),
    "bad edge timeout": ({"edge": {"headerTimeout": "ten seconds"}}, "/edge/headerTimeout"),
    "zero edge cap": ({"edge": {"maxRequests": 0}}, "/edge/maxRequests"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(chart, name):
    values, where = BAD_VALUES[name]
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, values)
    assert where in str(err.value), str(err.value)


def test_schema_args_rejections_agree_with_serveargs():
    """Bad args that the chart's schema rejects are also rejected by ServeArgs (the schema adds no rules of its own
    there, it only moves the failure to install time)."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())["serve"]["args"]
    for name in ("zero attention workers", "typo in args", "unknown device", "cuda without GPUs per worker",
                 "nccl on cpu", "unknown dtype", "negative eplb slots"):
        args = merged(base, BAD_VALUES[name][0]["serve"]["args"])
        with pytest.raises(ValueError):
            ServeArgs.model_validate(args)


# The rules of k2ray/config.py's field validators, as JSON schema, by field path under serve.args. The types, enums,
# nullability and the ban on unknown fields come from the pydantic models themselves.
ARGS_CONSTRAINTS: dict[tuple[str, ...], dict] = {
    ("model",): {"minLength": 1},
    ("max_queued_requests",): {"minimum": 1},
    ("max_request_bytes",): {"minimum": 1},
    ("default_max_tokens",): {"minimum": 1},
    ("router_cpus",): {"minimum": 0},
    ("router_gpus",): {"minimum": 0},
    ("responses_store_max",): {"minimum": 1},
    ("responses_store_ttl_s",): {"exclusiveMinimum": 0},
    ("max_images",): {"minimum": 1},
    ("max_image_bytes",): {"minimum": 1},
    ("max_image_pixels",): {"minimum": 1},
    ("image_fetch_timeout_s",): {"exclusiveMinimum": 0},
    ("vision_workers",): {"minimum": 0},
    ("vision_worker_cpus",): {"minimum": 0},
    ("vision_worker_gpus",): {"minimum": 0},
    ("vision_cache_images",): {"minimum": 0},
    ("vision_max_workers",): {"minimum": 0},
    ("vision_target_ongoing_requests",): {"exclusiveMinimum": 0},
    ("vision_max_batch_requests",): {"minimum": 1},
    ("vision_batch_wait_ms",): {"minimum": 0},
    ("engine", "block_size"): {"minimum": 1},
    ("engine", "num_kv_blocks"): {"minimum": 1},
    ("engine", "kv_cache_memory_gb"): {"exclusiveMinimum": 0},
    ("engine", "max_num_seqs"): {"minimum": 1},
    ("engine", "max_num_batched_tokens"): {"minimum": 1},
    ("engine", "max_model_len"): {"minimum": 1},
    ("engine", "attention_cost_tokens"): {"minimum": 1},
    ("engine", "max_step_cost"): {"minimum": 1},
    ("engine", "max_step_ms"): {"exclusiveMinimum": 0},
    ("parallel",): {"allOf": [
        {"if": {"required": ["device"], "properties": {"device": {"const": "cuda"}}},
         "then": {"required": ["gpus_per_worker"], "properties": {"gpus_per_worker": {"exclusiveMinimum": 0}}}},
        {"if": {"required": ["backend"], "properties": {"backend": {"const": "nccl"}}},
         "then": {"required": ["device"], "properties": {"device": {"const": "cuda"}}}},
    ]},
    ("parallel", "attention_workers"): {"minimum": 1},
    ("parallel", "expert_shards"): {"minimum": 1},
    ("parallel", "gpus_per_worker"): {"minimum": 0},
    ("parallel", "cpus_per_worker"): {"minimum": 0},
    ("parallel", "redundant_experts"): {"minimum": 0},
    ("parallel", "collective_timeout_s"): {"exclusiveMinimum": 0},
    ("parallel", "eplb", "window_steps"): {"minimum": 1},
    ("parallel", "eplb", "interval_steps"): {"minimum": 0},
    ("parallel", "eplb", "redundant_slots_per_shard"): {"minimum": 0},
    ("parallel", "attention_pool", "gpus"): {"minimum": 0},
    ("parallel", "attention_pool", "cpus"): {"minimum": 0},
    ("parallel", "attention_pool", "resources"): {"additionalProperties": {"type": "number", "minimum": 0}},
    ("parallel", "expert_pool", "gpus"): {"minimum": 0},
    ("parallel", "expert_pool", "cpus"): {"minimum": 0},
    ("parallel", "expert_pool", "resources"): {"additionalProperties": {"type": "number", "minimum": 0}},
}


def generate_args_schema() -> dict:
    """The serve.args part of values.schema.json, derived from ServeArgs (refs inlined, titles and defaults dropped,
    ARGS_CONSTRAINTS added)."""
    raw = ServeArgs.model_json_schema()
    defs = raw.pop("$defs", {})

    def inline(node):
        if isinstance(node, list):
            return [inline(x) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            node = {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        return {k: (inline(v) if k != "properties" else {n: inline(x) for n, x in v.items()})
                for k, v in node.items() if k not in ("title", "default")}

    schema = inline(raw)
    for path, rules in ARGS_CONSTRAINTS.items():
        node = schema
        for name in path:
            props = node.get("properties", {})
            assert name in props, f"ARGS_CONSTRAINTS: ServeArgs has no field {'.'.join(path)}"
            node = props[name]
        node.update(copy.deepcopy(rules))
    schema["required"] = ["model"]
    return schema


def _args_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())["properties"]["serve"]["properties"]["args"]


def write_args_schema() -> None:
    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    schema["properties"]["serve"]["properties"]["args"] = generate_args_schema()
    path.write_text(json.dumps(schema, indent=2) + "\n")


def test_schema_args_in_step_with_serveargs():
    """values.schema.json checks serve.args exactly as k2ray.config.ServeArgs does (every field, no other, same
    types and choices): a field added in k2ray/config.py must reach the chart's schema."""
    assert _args_schema() == generate_args_schema(), (
        "helm/k2ray/values.schema.json serve.args is out of date with k2ray.config.ServeArgs: "
        "run `python tests/test_helm_chart.py --write-schema`")
    # The models' own defaults pass the schema.
    jsonschema.validate(json.loads(ServeArgs().model_dump_json()), _args_schema())


def test_values_files_args_are_serveargs():
    for values in (yaml.safe_load((CHART / "values.yaml").read_text()), KIMI_VALUES):
        args = merged(yaml.safe_load((CHART / "values.yaml").read_text()), values)["serve"]["args"]
        ServeArgs.model_validate(args)
        jsonschema.validate(args, _args_schema())


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["name"] == "k2ray" and meta["apiVersion"] == "v2" and meta["type"] == "application"
    assert chart.schema is not None
    # No host paths or registry hosts baked into the chart.
    for path in CHART.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".tpl", ".txt", ".json", ".md"):
            text = path.read_text()
            assert "/work/" not in text and "/root/" not in text, path


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-schema"]:
        write_args_schema()
        print(f"updated serve.args in {CHART / 'values.schema.json'}")
    else:
        sys.exit("usage: python tests/test_helm_chart.py --write-schema")
