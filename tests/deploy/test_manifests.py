"""deploy/k8s: every manifest against its schema, and the facts the manifests must agree on.

Built-in kinds are validated by kubernetes-validate (Kubernetes' own OpenAPI schemas, bundled,
strict: an unknown field is an error) at the oldest Kubernetes the manifests claim (1.30: the
preStop `sleep` action) and the newest bundled; custom resources against the openAPIV3Schema of
their upstream CRD (tests/deploy/crds). Containers' arguments are parsed by the programs' own
parsers (mlctrio's, sglang-router's), so a misspelt flag fails here, not in a pod.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from sglang_router.launch_router import parse_router_args

from mlctrio.cli import RaisingParser, build_parser, config_from_args
from mlctrio.config import ServerConfig

from .manifests import CRDS, all_docs, container, epp_config, find, load_docs, manifest_files

K8S_VERSIONS = ("1.30", latest_version())
CRD_FILES = {  # (apiVersion, kind) -> the upstream CRD
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_"
    "inferencepools.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / CRD_FILES[(api_version, kind)]).read_text())
    version = api_version.rpartition("/")[2]
    assert crd["spec"]["group"] == api_version.partition("/")[0]
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def validate(doc: dict[str, Any], k8s_version: str) -> None:
    """Raise if `doc` does not validate (jsonschema.ValidationError or a schema-not-found)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_FILES:
        jsonschema.Draft7Validator(crd_schema(*key)).validate(doc)
        assert doc["metadata"]["name"]
    else:
        kubernetes_validate.validate(doc, k8s_version, strict=True)


def mlctrio_config() -> ServerConfig:
    args = container(find("Deployment", "mlctrio"), "mlctrio")["args"]
    return config_from_args(build_parser(RaisingParser).parse_args(args))


# ---- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates(path: Any, k8s_version: str) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        validate(doc, k8s_version)


def test_the_manifests_cover_the_deployment() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in all_docs()}
    for expected in [
        ("Deployment", "mlctrio"),
        ("Service", "mlctrio"),
        ("PersistentVolumeClaim", "mlctrio-cache"),
        ("Deployment", "mlctrio-router"),
        ("Role", "mlctrio-router"),
        ("InferencePool", "mlctrio"),
        ("Deployment", "mlctrio-epp"),
        ("ScaledObject", "mlctrio"),
        ("HorizontalPodAutoscaler", "mlctrio"),
    ]:
        assert expected in kinds


@pytest.mark.parametrize(
    ("kind", "name", "mutate"),
    [
        ("Deployment", "mlctrio", lambda d: d["spec"].pop("selector")),
        ("Deployment", "mlctrio", lambda d: d["spec"]["template"]["spec"].update(gracePeriod=45)),
        ("Service", "mlctrio", lambda d: d["spec"]["ports"][0].update(port="http")),
        ("InferencePool", "mlctrio", lambda d: d["spec"].pop("targetPorts")),
        ("InferencePool", "mlctrio", lambda d: d["spec"].update(appProtocol="grpc")),
        ("ScaledObject", "mlctrio", lambda d: d["spec"].pop("scaleTargetRef")),
    ],
    ids=["no-selector", "unknown-field", "port-type", "no-ports", "bad-enum", "no-target"],
)
def test_the_validation_rejects_broken_manifests(kind: str, name: str, mutate: Any) -> None:
    """The validation is not vacuous: a broken copy of each kind of manifest fails."""
    doc = copy.deepcopy(find(kind, name))
    validate(doc, K8S_VERSIONS[0])  # the original passes
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, K8S_VERSIONS[0])


# ---- the mlctrio Deployment ----------------------------------------------------------------------


def test_mlctrio_args_parse_and_serve_on_the_container_port() -> None:
    deployment = find("Deployment", "mlctrio")
    main = container(deployment, "mlctrio")
    config = mlctrio_config()
    (port,) = main["ports"]
    assert (config.host, config.port) == ("0.0.0.0", port["containerPort"])
    assert config.vllm_metrics  # the KEDA example reads vllm:* names
    service = find("Service", "mlctrio")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_readiness_is_health_and_grace_covers_prestop_and_drain() -> None:
    spec = find("Deployment", "mlctrio")["spec"]["template"]["spec"]
    main = container(find("Deployment", "mlctrio"), "mlctrio")
    probe = main["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert probe["port"] in (main["ports"][0]["name"], main["ports"][0]["containerPort"])
    # liveness must not be /health: it answers 503 for the minutes a first compile takes
    assert main["livenessProbe"].get("httpGet", {}).get("path") != "/health"
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = mlctrio_config().shutdown_timeout_s
    assert pre_stop > 0
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + shutdown


def test_cache_volume_and_cpu_manager_hints() -> None:
    spec = find("Deployment", "mlctrio")["spec"]["template"]["spec"]
    main = container(find("Deployment", "mlctrio"), "mlctrio")
    env = {e["name"]: e["value"] for e in main["env"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    cache = volumes[mounts[env["MLCTRIO_CACHE_DIR"]]]
    claim = find("PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["resources"]["requests"]["storage"]
    # Guaranteed QoS with whole CPUs: what the static CPU manager pins to exclusive cores
    resources = main["resources"]
    assert resources["requests"] == resources["limits"]
    cpus = resources["limits"]["cpu"]
    assert str(cpus).isdigit()
    assert mlctrio_config().overrides.num_threads == int(cpus)


# ---- the router ----------------------------------------------------------------------------------


def test_router_discovers_the_mlctrio_pods() -> None:
    router = find("Deployment", "mlctrio-router")
    main = container(router, "router")
    assert main["command"][-2:] == ["-m", "sglang_router.launch_router"]
    args = parse_router_args(main["args"])  # sglang-router's own parser
    assert args.service_discovery
    pod = find("Deployment", "mlctrio")["spec"]["template"]
    assert args.selector and args.selector.items() <= pod["metadata"]["labels"].items()
    assert args.service_discovery_port == mlctrio_config().port
    assert args.port == main["ports"][0]["containerPort"]
    service = find("Service", "mlctrio-router")
    assert service["spec"]["ports"][0]["targetPort"] == main["ports"][0]["name"]


def test_router_may_watch_pods() -> None:
    account = find("Deployment", "mlctrio-router")["spec"]["template"]["spec"]["serviceAccountName"]
    binding = find("RoleBinding", "mlctrio-router")
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    role = find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    assert any(
        "pods" in rule["resources"] and {"get", "list", "watch"} <= set(rule["verbs"])
        for rule in role["rules"]
    )


# ---- the InferencePool and its endpoint picker ---------------------------------------------------


def test_inferencepool_selects_the_mlctrio_pods_and_names_its_picker() -> None:
    pool = find("InferencePool", "mlctrio")["spec"]
    pod = find("Deployment", "mlctrio")["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [p["number"] for p in pool["targetPorts"]] == [mlctrio_config().port]
    picker = find("Service", pool["endpointPickerRef"]["name"])
    assert pool["endpointPickerRef"]["port"]["number"] in [
        p["port"] for p in picker["spec"]["ports"]
    ]
    epp = container(find("Deployment", "mlctrio-epp"), "epp")
    args = epp["args"]
    assert args[args.index("--pool-name") + 1] == "mlctrio"


def test_epp_reads_its_config_and_the_config_is_consistent() -> None:
    deployment = find("Deployment", "mlctrio-epp")
    epp = container(deployment, "epp")
    path = epp["args"][epp["args"].index("--config-file") + 1]
    (mount,) = [m for m in epp["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    config_map = find("ConfigMap", volume["configMap"]["name"])
    assert path.rpartition("/")[2] in config_map["data"]
    config = epp_config()
    assert (config["apiVersion"], config["kind"]) == (
        "inference.networking.x-k8s.io/v1alpha1",
        "EndpointPickerConfig",
    )
    plugins = {p.get("name", p["type"]) for p in config["plugins"]}
    refs = {r["pluginRef"] for prof in config["schedulingProfiles"] for r in prof["plugins"]}
    for source in config["data"]["sources"]:
        refs |= {source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])}
    assert refs <= plugins
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    engines = {e["name"]: e for e in extractor["parameters"]["engineConfigs"]}
    mlctrio = engines[extractor["parameters"]["defaultEngine"]]
    assert mlctrio["queuedRequestsSpec"].startswith("mlctrio_")
    assert mlctrio["kvUsageSpec"].startswith("mlctrio_")
