"""Loading deploy/: the Kubernetes manifests, the EPP plugin config and the Grafana dashboard, and
the metric names each of them reads (shared by the tests in this folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "mlctrio-dashboard.json"
CRDS = Path(__file__).resolve().parent / "crds"

# mlctrio's and vLLM's series names, as PromQL or a spec string writes them
METRIC_NAME = re.compile(r"\b(?:mlctrio_[a-z0-9_]+|vllm:[a-z0-9_:]+)")


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_docs() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_docs(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    return found


def epp_config() -> dict[str, Any]:
    config = find("ConfigMap", "mlctrio-epp")["data"]["mlctrio-plugins.yaml"]
    loaded: dict[str, Any] = yaml.safe_load(config)
    return loaded


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def metric_references() -> dict[str, set[str]]:
    """Every metric name that something in deploy/ reads, by reader."""
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [json.dumps(v.get("query", "")) for v in board["templating"]["list"]]
    epp = [
        spec
        for plugin in epp_config()["plugins"]
        for engine in plugin.get("parameters", {}).get("engineConfigs", [])
        for key, spec in engine.items()
        if key.endswith("Spec")
    ]
    keda = [
        t["metadata"]["query"]
        for t in find("ScaledObject", "mlctrio")["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    hpa = [
        m["pods"]["metric"]["name"]
        for m in find("HorizontalPodAutoscaler", "mlctrio")["spec"]["metrics"]
        if m["type"] == "Pods"
    ]
    return {
        reader: {name for text in texts for name in METRIC_NAME.findall(text)}
        for reader, texts in {"grafana": exprs, "epp": epp, "keda": keda, "hpa": hpa}.items()
    }
