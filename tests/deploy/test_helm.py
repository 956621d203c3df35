"""charts/fedhpc without a cluster.

The chart is rendered offline (helm-python-sdk, the Helm v4 SDK) with the default values and
four variants, linted, and every rendered core object is validated with kubernetes-validate
--strict against the Kubernetes 1.29 and 1.33 schemas. ServiceMonitor and PrometheusRule
(monitoring.coreos.com/v1) are CRDs outside those schemas: they get a structural check here
instead (required fields, that the ServiceMonitor selects the three metrics Services and names
their jobs as the alerts expect, that the rule groups are monitoring/alerts.yml's).
Beyond the schemas: security contexts and probes on every pod, ports that agree across Services,
containers, probes and the fedhpc configuration, and the rendered configuration plus the
containers' environment (Secrets replaced by stand-ins) loading with fedhpc's own loader.
Bad values must be refused by values.schema.json with a message naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmError

import fedhpc
from fedhpc.common.config import FedhpcConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fedhpc"
RELEASE, NAMESPACE = "demo", "fl"
FULLNAME = f"{RELEASE}-fedhpc"  # the resource name prefix unless fullnameOverride is set
KUBE_VERSIONS = ("1.29.0", "1.33.0")
COMPONENTS = {"registry": (50051, 9101), "aggregator": (50052, 9102), "coordinator": (50053, 9103)}
CRD_GROUP = "monitoring.coreos.com/v1"

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-s3": {
        "store": {
            "kind": "s3",
            "endpoint": "s3.us-east-1.amazonaws.com:443",
            "region": "us-east-1",
            "bucket": "fedhpc-models",
            "existingSecret": "aws-s3",
            "publicEndpoint": "s3.us-east-1.amazonaws.com:443",
        },
        "registry": {"replicas": 3, "service": {"type": "LoadBalancer"}},
    },
    "tls-auth": {
        "tls": {"enabled": True, "existingSecret": "fedhpc-tls"},
        "auth": {"enabled": True, "existingSecret": "fedhpc-tokens"},
        "globus": {"existingSecret": "fedhpc-globus"},
        "coordinator": {"trainerRegistryAddress": "registry.fedhpc.example.org:443"},
    },
    "minio-monitoring-hpa": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "grafanaDashboard": {"enabled": True},
        },
        "aggregator": {
            "autoscaling": {"enabled": True, "maxReplicas": 6, "targetMemoryUtilizationPercentage": 80}
        },
        "networkPolicy": {
            "clients": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "operators"}}}],
            "metrics": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
        },
        "extraConfig": {"aggregator": {"threads": 8}, "registry": {"presign_ttl_seconds": 600}},
    },
    # Every remaining key set to something other than its default.
    "scheduling-and-naming": {
        "fullnameOverride": "fl",
        "image": {"repository": "registry.example.org/fedhpc/control-plane", "tag": "0.1.0-rc1"},
        "imagePullSecrets": [{"name": "pull"}],
        "serviceAccount": {"create": False, "name": "fedhpc-sa"},
        "log": {"level": "DEBUG", "json": False},
        "minio": {"persistence": {"size": "100Gi", "storageClass": "fast"}},
        "coordinator": {"persistence": {"storageClass": "fast"}, "service": {"type": "NodePort"}},
        "registry": {"service": {"annotations": {"example.org/lb": "internal"}}},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "podAnnotations": {"example.org/team": "fl"},
        "podLabels": {"example.org/cost-center": "hpc"},
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "fl", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "fedhpc"}},
                        },
                    }
                ]
            }
        },
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "networkPolicy": {"enabled": False},
        "tmpSizeLimit": "8Gi",
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with Chart.load(CHART) as loaded:
        yield loaded


def _render(chart: Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


def _objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


class Rendered(NamedTuple):
    name: str
    values: dict[str, Any]  # the chart's defaults merged with the variant's values
    objects: list[dict[str, Any]]
    fullname: str  # the resource name prefix


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, chart: Chart) -> Rendered:
    name: str = request.param
    values = VARIANTS[name]
    merged = chart.merge_values(values)
    return Rendered(name, merged, _objects(_render(chart, values)), merged["fullnameOverride"] or FULLNAME)


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


# -- rendering, lint, Kubernetes schemas -------------------------------------------------------
def test_renders_the_expected_objects(variant: Rendered) -> None:
    values, objects, full = variant.values, variant.objects, variant.fullname
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for component in COMPONENTS:
        kind = "StatefulSet" if component == "coordinator" else "Deployment"
        assert (kind, f"{full}-{component}") in kinds
        assert ("Service", f"{full}-{component}") in kinds
    assert ("ConfigMap", f"{full}-config") in kinds
    assert (("StatefulSet", f"{full}-minio") in kinds) == (values["store"]["kind"] == "minio")
    hpa = ("HorizontalPodAutoscaler", f"{full}-aggregator") in kinds
    assert hpa == values["aggregator"]["autoscaling"]["enabled"]
    assert not [o for o in objects if o["kind"] == "Secret"], "the chart must not create Secrets"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, obj["metadata"]["name"]


def test_lint_reports_no_errors_or_warnings(variant: Rendered) -> None:
    for version in KUBE_VERSIONS:
        report = lint(CHART, VARIANTS[variant.name], kube_version=f"v{version}", namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (version, problems, report["errors"])


def test_the_checks_have_teeth(chart: Chart) -> None:
    # lint reports bad values as errors (severity 3)...
    report = lint(CHART, {"store": {"kind": "ftp"}}, kube_version="v1.29.0")
    assert any(m["severity"] == 3 and "/store/kind" in m["error"] for m in report["messages"])
    # ...and strict validation refuses an unknown field in a rendered object.
    deployment = _find(_objects(_render(chart, {})), "Deployment", f"{FULLNAME}-registry")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.29.0", strict=True)


def test_core_objects_pass_kubernetes_validate_strict(
    variant: Rendered,
) -> None:
    checked = 0
    objects = variant.objects
    for obj in objects:
        if obj["apiVersion"] == CRD_GROUP:
            continue  # CRDs: not in the core schemas; see test_crd_objects_are_well_formed
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")
            checked += 1
    assert checked >= 2 * 10


def test_crd_objects_are_well_formed(chart: Chart) -> None:
    """Structural check of the CRD objects (the core schemas do not know them)."""
    objects = _objects(_render(chart, VARIANTS["minio-monitoring-hpa"]))
    monitor = _find(objects, "ServiceMonitor", FULLNAME)
    rule = _find(objects, "PrometheusRule", FULLNAME)
    for obj in (monitor, rule):
        assert obj["apiVersion"] == CRD_GROUP
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [
        o
        for o in objects
        if o["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
    ]
    assert sorted(o["metadata"]["name"] for o in selected) == sorted(f"{FULLNAME}-{c}" for c in COMPONENTS)
    for service in selected:
        # The job label becomes fedhpc-<component>: what alerts.yml's up{job=~"fedhpc-.*"} matches.
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        assert service["metadata"]["labels"][spec["jobLabel"]] == f"fedhpc-{component}"
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert all(e["port"] in ports for e in spec["endpoints"])
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "relabelings"}
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint["interval"])
        # The metrics' own `service` label (gRPC service) must not become exported_service.
        assert {"action": "labeldrop", "regex": "service"} in endpoint["relabelings"]
    groups = rule["spec"]["groups"]
    assert set(rule["spec"]) == {"groups"} and groups
    for group in groups:
        assert isinstance(group["name"], str) and group["rules"]
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item), item
            assert isinstance(item["expr"], str) and item["expr"].strip()
            assert set(item) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
    alerts = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    assert groups == alerts["groups"], "the PrometheusRule must carry monitoring/alerts.yml's groups"


def test_chart_copies_equal_the_monitoring_files() -> None:
    # The chart can only read files inside itself (.Files.Get): it carries copies (docs/deploy.md).
    for copy, source in (
        (CHART / "files" / "alerts.yml", ROOT / "monitoring" / "alerts.yml"),
        (CHART / "dashboards" / "fedhpc.json", ROOT / "monitoring" / "grafana" / "fedhpc.json"),
    ):
        assert source.is_file(), f"{source} is missing"
        assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: cp {source} {copy}"


def test_dashboard_configmap(chart: Chart) -> None:
    objects = _objects(_render(chart, VARIANTS["minio-monitoring-hpa"]))
    config_map = _find(objects, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (ROOT / "monitoring" / "grafana" / "fedhpc.json").read_text()
    assert config_map["data"]["fedhpc.json"] == source.rstrip("\n")


# -- pods: security and probes -------------------------------------------------------------------
def test_every_pod_is_locked_down(variant: Rendered) -> None:
    values, objects = variant.values, variant.objects
    workloads = _workloads(objects)
    assert len(workloads) >= 3
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["securityContext"].get("runAsUser") == values["podSecurityContext"].get("runAsUser"), name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, (name, container["name"])
            assert container["resources"].get("requests"), (name, container["name"])
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_every_container_has_probes(variant: Rendered) -> None:
    values, objects, full = variant.values, variant.objects, variant.fullname
    for workload in _workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where}: no {probe}"
            if container["name"] not in COMPONENTS:
                continue
            port = COMPONENTS[container["name"]][0]
            service = f"fedhpc.v1.{container['name'].title()}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = container[probe]
                if values["tls"]["enabled"]:
                    # Kubernetes' gRPC probes cannot do TLS: the image's probe verifies ca.crt.
                    command = spec["exec"]["command"]
                    assert command[:2] == ["fedhpc-healthcheck", container["name"]], where
                    assert "--tls-ca=/etc/fedhpc/tls/ca.crt" in command
                    server_name = f"{full}-{container['name']}.{NAMESPACE}.svc"
                    assert f"--server-name={server_name}" in command
                else:
                    assert spec["grpc"] == {"port": port, "service": service}, where


def test_coordinator_state_is_on_a_volume_claim(
    variant: Rendered,
) -> None:
    values, objects, full = variant.values, variant.objects, variant.fullname
    coordinator = _find(objects, "StatefulSet", f"{full}-coordinator")
    assert coordinator["spec"]["replicas"] == 1
    (claim,) = coordinator["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == values["coordinator"]["persistence"]["size"]
    (container,) = coordinator["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    headless = _find(objects, "Service", coordinator["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_services_select_pods_and_ports_line_up(
    variant: Rendered,
) -> None:
    objects, full = variant.objects, variant.fullname
    workloads = _workloads(objects)
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    for component, (grpc_port, metrics_port) in COMPONENTS.items():
        service = _find(objects, "Service", f"{full}-{component}")
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
            "grpc": grpc_port,
            "metrics": metrics_port,
        }


def test_network_policies(variant: Rendered) -> None:
    values, objects, full = variant.values, variant.objects, variant.fullname
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    if not values["networkPolicy"]["enabled"]:
        assert not policies
        return
    aggregator = policies[f"{full}-aggregator"]["spec"]
    (grpc_rule,) = [r for r in aggregator["ingress"] if r["ports"][0]["port"] == "grpc"]
    coordinator = _find(objects, "StatefulSet", f"{full}-coordinator")
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": coordinator["spec"]["selector"]["matchLabels"]}}
    ]
    clients = values["networkPolicy"]["clients"]
    for component in ("registry", "coordinator"):
        rules = policies[f"{full}-{component}"]["spec"]["ingress"]
        (grpc_rule,) = [r for r in rules if r["ports"][0]["port"] == "grpc"]
        if clients:
            assert grpc_rule["from"][1:] == clients
        else:
            assert "from" not in grpc_rule
    assert (f"{full}-minio" in policies) == (values["store"]["kind"] == "minio")


# -- the fedhpc configuration the pods load --------------------------------------------------------
def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it, Secrets replaced by stand-ins."""
    stand_ins = {
        "admin-tokens": "admin-1, admin-2",
        "internal-token": "internal-1",
        "site-tokens": "[{token: site-1-token, site: polaris, experiment: '*'}]",
    }
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = stand_ins.get(ref["key"], f"{ref['name']}/{ref['key']}")
    return env


def _loaded_configs(
    objects: list[dict[str, Any]], full: str, tmp_path: Path
) -> dict[str, tuple[FedhpcConfig, dict[str, str]]]:
    config_map = _find(objects, "ConfigMap", f"{full}-config")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    loaded = {}
    for workload in _workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["name"] in COMPONENTS:
                env = _container_env(container)
                assert env.pop("FEDHPC_CONFIG") == "/etc/fedhpc/config/config.yaml"
                assert container["args"] == [container["name"], "serve"]
                loaded[container["name"]] = (load_config(path, env=env), env)
    assert set(loaded) == set(COMPONENTS)
    return loaded


def test_config_and_environment_load_with_fedhpc(variant: Rendered, tmp_path: Path) -> None:
    name, values, objects, full = variant.name, variant.values, variant.objects, variant.fullname
    loaded = _loaded_configs(objects, full, tmp_path)
    for component, (config, _) in loaded.items():
        server = getattr(config, component).server
        assert (server.host, server.port, server.metrics_port) == ("0.0.0.0", *COMPONENTS[component])
        assert config.store.kind == "s3"
        assert (
            config.store.access_key
            == f"{values['store']['existingSecret']}/{values['store']['accessKeyKey']}"
        )
        assert config.store.bucket == values["store"]["bucket"]
        if values["store"]["kind"] == "minio":
            assert (config.store.endpoint, config.store.secure) == (
                f"{full}-minio.{NAMESPACE}.svc:9000",
                False,
            )
        else:
            assert (config.store.endpoint, config.store.secure) == (values["store"]["endpoint"], True)
        assert (server.tls is not None) == values["tls"]["enabled"]
        auth = server.auth
        assert auth.enabled == values["auth"]["enabled"]
        if auth.enabled:
            assert [t.get_secret_value() for t in auth.admin_tokens] == ["internal-1", "admin-1", "admin-2"]
            assert [s.site for s in auth.site_tokens] == ([] if component == "aggregator" else ["polaris"])
    aggregator = loaded["aggregator"][0].aggregator
    coordinator = loaded["coordinator"][0].coordinator
    assert (
        aggregator.registry_address
        == coordinator.registry_address
        == f"{full}-registry.{NAMESPACE}.svc:50051"
    )
    assert coordinator.aggregator_address == f"{full}-aggregator.{NAMESPACE}.svc:50052"
    assert str(coordinator.data_dir) == "/data"
    if values["auth"]["enabled"]:
        for token in (aggregator.registry_token, coordinator.registry_token, coordinator.aggregator_token):
            assert token is not None and token.get_secret_value() == "internal-1"
    if values["tls"]["enabled"]:
        assert (
            str(aggregator.registry_tls_ca) == str(coordinator.aggregator_tls_ca) == "/etc/fedhpc/tls/ca.crt"
        )
        assert loaded["coordinator"][1]["GLOBUS_COMPUTE_CLIENT_ID"] == "fedhpc-globus/client-id"
    if name == "minio-monitoring-hpa":
        assert aggregator.threads == 8 and loaded["registry"][0].registry.presign_ttl_seconds == 600


def test_notes_name_the_secrets(chart: Chart) -> None:
    notes = _render(chart, VARIANTS["tls-auth"])["fedhpc/templates/NOTES.txt"]
    for secret in ("fedhpc-s3", "fedhpc-tls", "fedhpc-tokens", "fedhpc-globus"):
        assert secret in notes
    assert "port-forward" in notes and "WARNING" not in notes
    assert "WARNING" in _render(chart, {})["fedhpc/templates/NOTES.txt"]


# -- values: schema, versions, docs --------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"registry": {"replicas": "two"}}, "at '/registry/replicas': got string, want integer"),
        ({"surprise": True}, "additional properties 'surprise' not allowed"),
        ({"registry": {"replica": 2}}, "additional properties 'replica' not allowed"),
        ({"store": {"kind": "ftp"}}, "at '/store/kind': value must be one of 'minio', 's3'"),
        ({"store": {"kind": "s3"}}, "at '/store/endpoint': minLength"),
        ({"store": {"kind": "s3", "endpoint": "https://s3:443"}}, "at '/store/endpoint'"),
        ({"store": {"existingSecret": ""}}, "at '/store/existingSecret': minLength"),
        ({"tls": {"enabled": True}}, "at '/tls/existingSecret': minLength"),
        ({"auth": {"enabled": True}}, "at '/auth/existingSecret': minLength"),
        ({"log": {"level": "TRACE"}}, "at '/log/level': value must be one of"),
        ({"aggregator": {"autoscaling": {"enabled": "yes"}}}, "at '/aggregator/autoscaling/enabled'"),
        ({"coordinator": {"persistence": {"size": "lots"}}}, "at '/coordinator/persistence/size'"),
        ({"minio": {"image": {"tag": "latest"}}}, "at '/minio/image/tag'"),
        ({"registry": {"service": {"type": "Ingress"}}}, "at '/registry/service/type'"),
        ({"podSecurityContext": {"runAsUser": 0}}, "at '/podSecurityContext/runAsUser'"),
    ],
)
def test_schema_rejects_bad_values(chart: Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmError) as caught:
        _render(chart, values)
    assert message in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"aggregator": {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}}},
            "aggregator.autoscaling needs aggregator.resources.requests.cpu",
        ),
        (
            {"aggregator": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "minReplicas must not exceed maxReplicas",
        ),
    ],
)
def test_templates_reject_inconsistent_values(chart: Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmError, match=re.escape(message)):
        _render(chart, values)


def test_versions_agree() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["appVersion"] == fedhpc.__version__
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["x-control-plane-image"]["image"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert image == f"{values['image']['repository']}:{fedhpc.__version__}"
    dockerfile = (ROOT / "containers" / "control-plane.Dockerfile").read_text()
    assert f"ARG VERSION={fedhpc.__version__}\n" in dockerfile
    minio = compose["services"]["minio"]["image"]
    assert f"{values['minio']['image']['repository']}:{values['minio']['image']['tag']}" in minio


def _leaf_keys(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "resources":
            yield from _leaf_keys(value, path + ".")
        else:
            yield path


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs.split("### Values reference", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `([\w.]+)` \|", section, re.MULTILINE))
    missing = sorted(set(_leaf_keys(values)) - table)
    assert not missing, f"docs/deploy.md's values table lacks {missing}"
    unknown = sorted(table - set(_leaf_keys(values)))
    assert not unknown, f"docs/deploy.md documents keys values.yaml does not have: {unknown}"
