"""The deployment kit (ops/deploy): what can be checked without a cluster or a Docker engine.

Kubernetes objects against the API schemas (kubernetes-validate, strict), the cross-references
between them (selectors, ports, the HPA's metric), every metric the dashboard, the alert rules and
the autoscaler read is one the gateway exports, PromQL syntax through promtool, and the Dockerfile
through hadolint plus the structure the deployment relies on. Tools that are not installed skip
their own test, with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "ops" / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "asyncllm-dashboard.json"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROM_RULES = DEPLOY / "prometheus" / "asyncllm-rules.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

_METRIC = re.compile(r"\b(?:asyncllm_|vllm:)[a-zA-Z0-9_:]+")


def _k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                out.append((f.name, doc))
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [d for _, d in _k8s_objects() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        d for _, d in _k8s_objects() if d.get("kind") == kind and d["metadata"]["name"] == name
    ]
    return found


def _exported_metric_names() -> set[str]:
    """Every series name the gateway's /metrics can carry, by metric type."""
    from asyncllm.gateway.metrics import Metrics

    names: set[str] = set()
    for fam in Metrics().registry.collect():
        if fam.type == "counter":
            names |= {f"{fam.name}_total", f"{fam.name}_created"}
        elif fam.type == "histogram":
            names |= {f"{fam.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        else:
            names.add(fam.name)
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v.get("type") == "query":
            exprs.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return exprs


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(PROM_RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# ---- Kubernetes --------------------------------------------------------------------------------


def test_every_k8s_document_is_an_object_with_the_required_fields():
    objs = _k8s_objects()
    kinds = {d["kind"] for _, d in objs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    for fname, d in objs:
        assert isinstance(d, dict), fname
        for key in ("apiVersion", "kind", "metadata"):
            assert key in d, f"{fname}: {key} missing"
        assert d["metadata"].get("name"), f"{fname}: metadata.name missing"


def test_k8s_objects_validate_against_the_api_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    version = kv.latest_version()
    checked = 0
    for _, d in _k8s_objects():
        if d["kind"] == "Kustomization":  # a kustomize file, not an API object
            continue
        kv.validate(d, version, strict=True)  # raises ValidationError, naming the field
        checked += 1
    assert checked >= 4
    # the validator is not vacuous: a wrong type and an unknown field both fail
    bad = json.loads(json.dumps(_one("Service")))
    bad["spec"]["sessionAffinity"] = 5
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)
    bad = json.loads(json.dumps(_one("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_kustomization_lists_files_that_exist():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for r in k["resources"]:
        assert (K8S / r).is_file(), r


def test_deployment_requests_a_gpu_and_probes_health():
    dep = _one("Deployment")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in ports or get["port"] in ports.values(), probe
    sc = pod["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) in ports.values()
    # the image's user and port are the ones the pod expects
    assert f"USER {sc['runAsUser']}" in DOCKERFILE.read_text()
    assert f"EXPOSE {ports['http']}" in DOCKERFILE.read_text()


def test_service_pins_a_client_to_its_pod_for_longer_than_resume_ttl():
    from asyncllm.gateway.settings import GatewaySettings

    svc, dep = _one("Service"), _one("Deployment")
    assert svc["spec"]["sessionAffinity"] == "ClientIP"
    timeout = svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
    assert timeout > GatewaySettings().resume_ttl
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])


def _session_maps(text: str) -> str:
    start = text.index("# --- begin session-key maps")
    end = text.index("# --- end session-key maps")
    return "\n".join(line.strip() for line in text[start:end].splitlines())


def test_ingress_routes_by_session_key_with_the_nginx_maps():
    """The ingress hashes on the variable the shipped nginx config routes by, defined by the
    same maps (the controller's http-snippet); nginx itself runs that config in
    tests/test_nginx_routing.py."""
    ing = _one("Ingress")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$asyncllm_route"
    assert "nginx.ingress.kubernetes.io/affinity" not in ann  # no cookie: keys route
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == _one("Service")["metadata"]["name"]
    snippet = _named("ConfigMap", "ingress-nginx-controller")["data"]["http-snippet"]
    conf = (DEPLOY / "nginx" / "asyncllm.conf").read_text()
    assert _session_maps(snippet) == _session_maps(conf)
    assert "map $asyncllm_session $asyncllm_route" in snippet
    assert "hash $asyncllm_route consistent;" in conf
    for carrier in ("$http_sec_websocket_protocol", "$http_x_asyncllm_session", "$arg_session"):
        assert carrier in snippet


def test_hpa_scales_the_deployment_on_an_exported_queue_gauge():
    hpa, dep = _one("HorizontalPodAutoscaler"), _one("Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (m,) = hpa["spec"]["metrics"]
    name = m["pods"]["metric"]["name"]
    assert name == "asyncllm_num_requests_waiting"
    assert name in _exported_metric_names()
    # prometheus-adapter serves the series under the same name
    adapter = yaml.safe_load(_named("ConfigMap", "asyncllm-adapter-rules")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == name
    assert set(_METRIC.findall(rule["seriesQuery"])) == {name}


# ---- Prometheus and Grafana -------------------------------------------------------------------


def test_dashboard_structure():
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    var_names = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in var_names
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"]
            for v in re.findall(r"\$(\w+)", t["expr"]):
                assert v in var_names or v.startswith("__"), f"{p['title']}: unknown ${v}"


def test_every_metric_the_dashboard_rules_and_adapter_read_is_exported():
    exported = _exported_metric_names()
    used: dict[str, str] = {}
    for e in _dashboard_exprs(_dashboard()):
        used.update(dict.fromkeys(_METRIC.findall(e), "dashboard"))
    for r in _rules():
        used.update(dict.fromkeys(_METRIC.findall(r["expr"]), f"rule {r['alert']}"))
    assert len(used) >= 10
    missing = {m: where for m, where in used.items() if m not in exported}
    assert not missing, f"not exported by asyncllm/gateway/metrics.py: {missing}"
    # and the dashboard shows every gateway metric (apart from the _created/_count/_sum series)
    families = {re.sub(r"_(total|bucket)$", "", m) for m in used}
    base = {re.sub(r"_(total|created|bucket|count|sum)$", "", m) for m in exported}
    assert base <= families, f"metrics without a panel: {sorted(base - families)}"


def test_prometheus_scrape_config_finds_the_pods():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    dep = _one("Deployment")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["asyncllm"]
    assert job["metrics_path"] == "/metrics"
    keep = {
        tuple(r["source_labels"]): r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    app = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert re.fullmatch(keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)], app)
    for rf in cfg["rule_files"]:
        assert (PROM_CONFIG.parent / rf).is_file(), rf


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (run ops/ci/install_test_tools.sh)",
)
def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path):
    def promtool(*args: str) -> None:
        r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

    promtool("check", "rules", str(PROM_RULES))
    # Debian's promtool is built without Kubernetes discovery: check the rest of the config with
    # that block swapped for a static target.
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    for j in cfg["scrape_configs"]:
        if j.pop("kubernetes_sd_configs", None) is not None:
            j["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    cfg["rule_files"] = [str(PROM_CONFIG.parent / f) for f in cfg["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    promtool("check", "config", str(tmp_path / "prometheus.yml"))
    # The dashboard's PromQL, with Grafana's variables filled in, as recording rules.
    subst = {"$__rate_interval": "1m", "$namespace": ".*", "$pod": ".*"}
    rules = []
    for i, e in enumerate(_dashboard_exprs(_dashboard())):
        if e.startswith("label_values("):  # a Grafana function, not PromQL
            e = re.match(r"label_values\((.*),\s*\w+\)$", e).group(1)
        for k, v in subst.items():
            e = e.replace(k, v)
        rules.append({"record": f"dashboard:q{i}", "expr": e})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    promtool("check", "rules", str(tmp_path / "dash.yml"))


# ---- the image ---------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    ins = _dockerfile_instructions()
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for op, r in ins if op == "ARG" and "=" in r}
    froms = [r for op, r in ins if op == "FROM"]
    assert len(froms) >= 2, "a build stage and a slim runtime stage"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    final = ins[last_from:]
    users = [r for op, r in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (hc,) = [r for op, r in final if op == "HEALTHCHECK"]
    assert "/health" in hc and "CMD" in hc
    (entry,) = [r for op, r in final if op == "ENTRYPOINT"]
    assert json.loads(entry)[:2] == ["asyncllm", "serve"]
    # everything the build copies from the context exists and passes the dockerignore
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for op, r in ins:
        if op == "COPY" and not r.startswith("--from"):
            for src in r.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert any(p.startswith("!" + src.rstrip("/")) for p in ignore), src


def test_dockerfile_entrypoint_flags_exist_in_the_cli():
    cli = pytest.importorskip("asyncllm.cli", reason="asyncllm.cli not there yet")
    entry = json.loads([r for op, r in _dockerfile_instructions() if op == "ENTRYPOINT"][-1])
    flags = [a for a in entry if a.startswith("--")]
    r = subprocess.run(
        ["python", "-c", "import sys, asyncllm.cli as c; sys.exit(c.main(['serve', '--help']))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    for f in flags:
        assert f in r.stdout, f"`asyncllm serve` has no {f}"
    del cli


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_passes():
    r = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
