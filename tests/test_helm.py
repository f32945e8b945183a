"""The Helm chart and the container image, checked offline.

The chart is linted and rendered by Helm's own Go SDK (PyPI ``helm-python-sdk``, which bundles it
as a shared library, so no ``helm`` binary is needed), every rendered object is validated against
the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, and the promises the chart
makes (hardened pod, probes, hooks, secrets, alerts) are asserted on the parsed manifests. The
Dockerfile cannot be built here (no container engine), so its text is parsed and checked.

The SDK runs in a child process, never in pytest's own: loading it starts a Go runtime, with its
threads and signal handlers, in the process that also runs the daemon's signal and subprocess
tests. One child serves every call of this module over a JSON-lines pipe.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers import EXPECTED_ALERTS

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm" / "flespi-mirror"
CI_DIR = CHART_DIR / "ci"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

RELEASE = "prod"
NAMESPACE = "telematics"
FULLNAME = f"{RELEASE}-flespi-mirror"
KUBE_VERSION = "1.30.0"  # oldest Kubernetes the manifests are validated against
CUSTOM_RESOURCE_KINDS = {"ServiceMonitor", "PrometheusRule"}
HOOK_EVENTS = {"pre-install", "pre-upgrade"}

CI_FILES = sorted(CI_DIR.glob("*-values.yaml"))
SCENARIOS = ["chart-defaults", *(path.name for path in CI_FILES)]


def ci_values(scenario: str) -> dict[str, Any] | None:
    if scenario == "chart-defaults":
        return None
    loaded: dict[str, Any] = yaml.safe_load((CI_DIR / scenario).read_text())
    return loaded


# ---------------------------------------------------------------------------------------------
# The helm-python-sdk child process

_HELM_WORKER = r"""
import json, os, sys

replies = os.fdopen(os.dup(1), "w")  # the protocol's own stream...
os.dup2(2, 1)                        # ...so whatever the Go side prints cannot corrupt it
import helm_python as helm

chart_dir = sys.argv[1]
for line in sys.stdin:
    request = json.loads(line)
    values, options = request["values"], request["options"]
    try:
        if request["op"] == "lint":
            result = helm.lint(chart_dir, values, **options)
        else:
            with helm.Chart.load(chart_dir) as chart:
                if request["op"] == "render":
                    result = chart.render(values, **options)
                else:
                    result = chart.validate_schema(values)
        reply = {"ok": True, "result": result}
    except helm.HelmError as error:
        reply = {"ok": False, "error": type(error).__name__, "message": str(error)}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
"""


class HelmCallError(Exception):
    """A helm-python-sdk call failed in the child; ``kind`` is its exception class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class HelmWorker:
    """``helm.lint``, ``Chart.render`` and ``Chart.validate_schema`` of one chart, in a child."""

    def __init__(self, chart_dir: Path) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _HELM_WORKER, str(chart_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, values: dict[str, Any] | None, **options: Any) -> Any:
        assert self._process.stdin and self._process.stdout
        request = {"op": op, "values": values, "options": options}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the helm-python-sdk child died (exit {self._process.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise HelmCallError(reply["error"], reply["message"])
        return reply["result"]

    def close(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@cache
def helm_worker() -> HelmWorker:
    return HelmWorker(CHART_DIR)


@pytest.fixture(scope="module", autouse=True)
def _stop_helm_worker() -> Iterator[None]:
    yield
    if helm_worker.cache_info().currsize:
        helm_worker().close()
        helm_worker.cache_clear()


def helm_lint(values: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    report: dict[str, Any] = helm_worker().call("lint", values, **options)
    return report


def validate_schema(values: dict[str, Any] | None) -> None:
    helm_worker().call("validate_schema", values)


def render_templates(values: dict[str, Any] | None = None) -> dict[str, str]:
    rendered: dict[str, str] = helm_worker().call(
        "render", values, name=RELEASE, namespace=NAMESPACE
    )
    return rendered


def parse_manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@cache
def _render_scenario_json(scenario: str) -> str:
    return json.dumps(parse_manifests(render_templates(ci_values(scenario))))


def render_scenario(scenario: str) -> list[dict[str, Any]]:
    """Objects of one scenario; rendered once, a fresh copy per call."""
    objects: list[dict[str, Any]] = json.loads(_render_scenario_json(scenario))
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = by_kind(objects, kind)
    assert len(matches) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "Deployment")


def daemon_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["mirror"]
    container: dict[str, Any] = containers[0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def hooks(obj: dict[str, Any]) -> set[str]:
    annotation = obj["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    return {event.strip() for event in annotation.split(",") if event.strip()}


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod template the chart renders: the daemon's and the migration Job's."""
    return [
        (f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
        for obj in objects
        if obj["kind"] in ("Deployment", "Job")
    ]


def chart_metadata() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    return loaded


def default_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    return loaded


# ---------------------------------------------------------------------------------------------
# Lint, render, schema


def test_helm_sdk_stays_out_of_the_test_process() -> None:
    assert helm_worker().call("validate_schema", None) is None
    assert "helm_python" not in sys.modules


def test_ci_folder_has_one_values_file_per_scenario() -> None:
    names = {path.name for path in CI_FILES}
    assert {
        "default-values.yaml",
        "existing-secret-values.yaml",
        "monitoring-values.yaml",
        "pdb-values.yaml",
        "no-migration-values.yaml",
        "custom-values.yaml",
        "postgres-tls-values.yaml",
    } <= names
    assert sorted(CI_DIR.iterdir()) == CI_FILES, "every file in ci/ must be a *-values.yaml"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints_strictly(scenario: str) -> None:
    report = helm_lint(ci_values(scenario), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert problems == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid_kubernetes(scenario: str) -> None:
    objects = render_scenario(scenario)
    assert objects
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["name"], name
        if obj["kind"] in CUSTOM_RESOURCE_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", name
            continue  # no OpenAPI schema offline: checked by the tests below instead
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{scenario}: {name} is invalid at {path}: {error.message}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_objects_carry_the_chart_labels_and_unique_names(scenario: str) -> None:
    objects = render_scenario(scenario)
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "flespi-mirror"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == f"flespi-mirror-{chart_metadata()['version']}"
        assert len(obj["metadata"]["name"]) <= 63


def test_default_install_creates_the_daemon_and_nothing_optional() -> None:
    kinds = sorted(obj["kind"] for obj in render_scenario("chart-defaults"))
    assert kinds == ["Deployment", "Job", "Secret", "Secret", "Service", "ServiceAccount"]


@pytest.mark.parametrize(
    ("values", "offending"),
    [
        ({"replicaCont": 2}, "replicaCont"),
        ({"serviceMonitor": {"enabeld": True}}, "enabeld"),
        ({"config": {"metricsPort": "9465x"}}, "metricsPort"),
        ({"config": {"logFormat": "yaml"}}, "logFormat"),
        ({"strategy": {"type": "BlueGreen"}}, "strategy"),
    ],
)
def test_wrong_values_fail_schema_validation_at_render_and_lint(
    values: dict[str, Any], offending: str
) -> None:
    with pytest.raises(HelmCallError, match=offending) as rendering:
        render_templates(values)
    assert rendering.value.kind == "HelmValuesError"
    with pytest.raises(HelmCallError, match=offending):
        validate_schema(values)
    report = helm_lint(values, strict=True)
    assert any(offending in error for error in report["errors"]), report


def test_schema_accepts_the_defaults_and_knows_exactly_their_keys() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = default_values()
    assert schema["additionalProperties"] is False

    def compare(schema_node: dict[str, Any], value_node: dict[str, Any], path: str) -> None:
        if schema_node.get("additionalProperties") is not False:
            return  # a free-form Kubernetes object (resources, affinity, ...)
        assert set(schema_node["properties"]) >= set(value_node), path
        for key, value in value_node.items():
            if isinstance(value, dict) and value:
                compare(schema_node["properties"][key], value, f"{path}.{key}")

    compare(schema, values, "values")
    assert set(schema["properties"]) == set(values), "values.yaml and the schema drifted apart"
    validate_schema(values)


# ---------------------------------------------------------------------------------------------
# Documentation of the values


def _value_paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict) and value and not _is_free_form(path):
            paths.extend(_value_paths(value, f"{path}."))
    return paths


def _is_free_form(path: str) -> bool:
    """Values passed verbatim to Kubernetes: documented as a whole, not key by key."""
    return path.split(".")[-1] in {
        "resources",
        "podSecurityContext",
        "securityContext",
        "strategy",
    }


def test_every_value_is_commented_in_values_yaml() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    uncommented = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([*(k for _, k in parents), key])
        parents.append((indent, key))
        if any(_is_free_form(".".join(k for _, k in parents[:i])) for i in range(1, len(parents))):
            continue  # inside a verbatim Kubernetes object, documented as a whole
        above = lines[index - 1].strip() if index else ""
        if not above.startswith("#"):
            uncommented.append(f"line {index + 1}: {path}")
    assert uncommented == []


def test_readme_documents_every_value_with_its_default() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `([^`]+)` \| `([^`]*)` \|", readme, flags=re.MULTILINE)
    }
    values = default_values()
    for path in _value_paths(values):
        node: Any = values
        for key in path.split("."):
            node = node[key]
        if isinstance(node, dict) and node and not _is_free_form(path):
            continue  # a section: its keys have their own rows
        assert path in rows, f"README.md has no row for {path}"
        assert json.loads(rows[path].replace("\\|", "|")) == node, f"README default of {path}"


# ---------------------------------------------------------------------------------------------
# The daemon's Deployment


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_are_hardened(scenario: str) -> None:
    for name, pod in pod_specs(render_scenario(scenario)):
        pod_security = pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        mounts_by_volume = {}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security.get("privileged", False) is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in security["capabilities"], name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, (name, bound)
            mounts_by_volume.update({m["name"]: m["mountPath"] for m in container["volumeMounts"]})
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        tmp = [volume for volume, path in mounts_by_volume.items() if path == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]], f"{name}: /tmp must be an emptyDir"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_check_healthz_and_readyz_on_the_metrics_port(scenario: str) -> None:
    objects = render_scenario(scenario)
    container = daemon_container(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert list(ports) == ["metrics"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    env = env_of(container)
    assert env["MIRROR_METRICS_PORT"]["value"] == str(ports["metrics"])
    assert env["MIRROR_METRICS_HOST"]["value"] == "0.0.0.0"

    service = only(objects, "Service")
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("metrics", "metrics")
    ]
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_one_replica_replaced_with_recreate_by_default() -> None:
    spec = deployment(render_scenario("chart-defaults"))["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_image_defaults_to_the_app_version_of_the_dockerfile_image() -> None:
    container = daemon_container(render_scenario("chart-defaults"))
    app_version = chart_metadata()["appVersion"]
    assert container["image"] == f"ghcr.io/flespi-mirror/flespi-mirror:{app_version}"
    assert container["args"][0] == "run"
    assert "command" not in container, "the image's ENTRYPOINT (flespi-mirror) must stay"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{app_version}"' in pyproject, "appVersion must follow the package version"


def test_image_digest_wins_over_the_tag() -> None:
    container = daemon_container(render_scenario("custom-values.yaml"))
    values = ci_values("custom-values.yaml")
    assert values is not None
    assert container["image"] == f"{values['image']['repository']}@{values['image']['digest']}"


def test_custom_values_reach_the_daemon() -> None:
    objects = render_scenario("custom-values.yaml")
    values = ci_values("custom-values.yaml")
    assert values is not None
    container = daemon_container(objects)
    assert container["args"] == ["run", "--no-migrate", *values["args"]]
    assert container["resources"] == values["resources"]
    env = env_of(container)
    assert env["TZ"] == {"name": "TZ", "value": "UTC"}
    assert env["MIRROR_MQTT_URL"]["value"] == values["config"]["mqttUrl"]
    assert env["MIRROR_CLIENT_ID"]["value"] == values["config"]["clientId"]
    assert env["MIRROR_SCHEMA"]["value"] == values["config"]["schema"]
    assert env["MIRROR_LOG_FORMAT"]["value"] == "text"
    assert env["MIRROR_SESSION_EXPIRY"]["value"] == "86400"
    assert env["MIRROR_RETENTION_DAYS"]["value"] == "90"
    assert env["MIRROR_TOMBSTONE_DAYS"]["value"] == "14"
    assert env["MIRROR_WORKERS"]["value"] == "2"
    assert env["MIRROR_CA_FILE"]["value"] == "/etc/flespi-mirror/ca/ca.crt"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/flespi-mirror/ca"] == "broker-ca"
    pod = deployment(objects)["spec"]["template"]
    assert pod["metadata"]["annotations"]["example.com/owner"] == "telematics"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_a_postgres_ca_from_a_secret_reaches_the_daemon_and_the_migration() -> None:
    objects = render_scenario("postgres-tls-values.yaml")
    for where, pod in pod_specs(objects):
        (container,) = pod["containers"]
        env = env_of(container)
        assert env["PGSSLROOTCERT"]["value"] == "/etc/flespi-mirror/postgres-ca/root.crt", where
        assert env["PGSSLMODE"]["value"] == "verify-full", where
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/flespi-mirror/postgres-ca"]["readOnly"] is True, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["postgres-ca"]["secret"]["secretName"] == "postgres-ca", where
    assert len(pod_specs(objects)) == 2


def test_without_a_postgres_ca_nothing_tls_is_rendered() -> None:
    for _, pod in pod_specs(render_scenario("default-values.yaml")):
        (container,) = pod["containers"]
        assert not {"PGSSLROOTCERT", "PGSSLMODE"} & set(env_of(container))
        assert "postgres-ca" not in {v["name"] for v in pod["volumes"]}


def test_defaults_leave_optional_settings_to_the_daemon() -> None:
    env = env_of(daemon_container(render_scenario("chart-defaults")))
    for name in (
        "MIRROR_CLIENT_ID",
        "MIRROR_SHARE_GROUP",
        "MIRROR_SESSION_EXPIRY",
        "MIRROR_RETENTION_DAYS",
        "MIRROR_COMPACT_AFTER",
        "MIRROR_TOMBSTONE_DAYS",
        "MIRROR_WORKERS",
        "MIRROR_CA_FILE",
    ):
        assert name not in env
    assert env["MIRROR_MQTT_URL"]["value"] == "mqtts://mqtt.flespi.io:8883"
    assert env["MIRROR_SCHEMA"]["value"] == "flespi"


def test_more_than_one_replica_needs_a_shared_subscription() -> None:
    with pytest.raises(HelmCallError, match=r"HelmRenderError.*shareGroup"):
        render_templates({"replicaCount": 2})
    with pytest.raises(HelmCallError, match=r"HelmRenderError.*clientId"):
        render_templates(
            {"replicaCount": 2, "config": {"shareGroup": "mirror", "clientId": "fixed-id"}}
        )
    env = env_of(daemon_container(render_scenario("shared-subscription-values.yaml")))
    assert env["MIRROR_SHARE_GROUP"]["value"] == "flespi-mirror"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["MIRROR_CLIENT_ID"]["value"] == "$(POD_NAME)"
    names = list(env)
    assert names.index("POD_NAME") < names.index("MIRROR_CLIENT_ID"), "$(VAR) needs VAR first"


# ---------------------------------------------------------------------------------------------
# Secrets


def _secret_ref(env: dict[str, dict[str, Any]], name: str) -> dict[str, str]:
    ref: dict[str, str] = env[name]["valueFrom"]["secretKeyRef"]
    return ref


def test_chart_secret_holds_the_token_and_the_database_url() -> None:
    objects = render_scenario("default-values.yaml")
    values = ci_values("default-values.yaml")
    assert values is not None
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    main = secrets[FULLNAME]
    assert not hooks(main), "the daemon's Secret is an ordinary release object"
    decoded = {key: base64.b64decode(data).decode() for key, data in main["data"].items()}
    assert decoded == {"flespi-token": values["flespiToken"], "database-url": values["databaseUrl"]}
    env = env_of(daemon_container(objects))
    assert _secret_ref(env, "FLESPI_TOKEN") == {"name": FULLNAME, "key": "flespi-token"}
    assert _secret_ref(env, "MIRROR_DATABASE_URL") == {"name": FULLNAME, "key": "database-url"}
    pod_annotations = deployment(objects)["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", pod_annotations["checksum/secret"])


def test_no_credential_is_rendered_in_plain_text() -> None:
    values = ci_values("default-values.yaml")
    assert values is not None
    rendered = render_templates(values)
    for path, text in rendered.items():
        assert values["flespiToken"] not in text, path
        assert "ci-password" not in text, path


def test_existing_secret_replaces_the_chart_secret() -> None:
    objects = render_scenario("existing-secret-values.yaml")
    assert by_kind(objects, "Secret") == []
    env = env_of(daemon_container(objects))
    expected = "flespi-mirror-credentials"
    assert _secret_ref(env, "FLESPI_TOKEN") == {"name": expected, "key": "FLESPI_TOKEN"}
    assert _secret_ref(env, "MIRROR_DATABASE_URL") == {
        "name": expected,
        "key": "MIRROR_DATABASE_URL",
    }
    job_env = env_of(only(objects, "Job")["spec"]["template"]["spec"]["containers"][0])
    assert _secret_ref(job_env, "MIRROR_DATABASE_URL") == {
        "name": expected,
        "key": "MIRROR_DATABASE_URL",
    }
    annotations = deployment(objects)["spec"]["template"]["metadata"].get("annotations", {})
    assert "checksum/secret" not in annotations


# ---------------------------------------------------------------------------------------------
# Migrations


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook_running_migrate() -> None:
    objects = render_scenario("default-values.yaml")
    job = only(objects, "Job")
    annotations = job["metadata"]["annotations"]
    assert hooks(job) == HOOK_EVENTS
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["args"] == ["migrate"]
    assert container["image"] == daemon_container(objects)["image"]
    assert "--no-migrate" in daemon_container(objects)["args"]
    # The chart's ServiceAccount is an ordinary object: it does not exist yet at pre-install.
    assert pod["serviceAccountName"] != only(objects, "ServiceAccount")["metadata"]["name"]


def test_migration_job_reads_a_hook_secret_created_before_it() -> None:
    objects = render_scenario("default-values.yaml")
    job = only(objects, "Job")
    ref = _secret_ref(
        env_of(job["spec"]["template"]["spec"]["containers"][0]), "MIRROR_DATABASE_URL"
    )
    hook_secret = next(
        s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == ref["name"]
    )
    assert hooks(hook_secret) == HOOK_EVENTS
    weight = int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert weight < int(job["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
    assert set(hook_secret["data"]) == {ref["key"]}, "the Job gets the database URL, not the token"
    assert "hook-succeeded" in hook_secret["metadata"]["annotations"]["helm.sh/hook-delete-policy"]


def test_migration_pods_are_not_selected_as_daemon_pods() -> None:
    objects = render_scenario("pdb-values.yaml")
    job_labels = only(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    selector = deployment(objects)["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job_labels.items()
    assert only(objects, "Service")["spec"]["selector"] == selector
    assert only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


def test_without_the_migration_job_the_daemon_migrates_itself() -> None:
    objects = render_scenario("no-migration-values.yaml")
    assert by_kind(objects, "Job") == []
    assert all(not hooks(obj) for obj in objects)
    assert "--no-migrate" not in daemon_container(objects)["args"]


# ---------------------------------------------------------------------------------------------
# Monitoring


PROMETHEUS_DURATION = re.compile(r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$")


def _rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rule = only(objects, "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert groups and all(group["name"] and group["rules"] for group in groups)
    return [r for group in groups for r in group["rules"]]


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in expr:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return all(count == 0 for count in depth.values())


def test_prometheus_rule_alerts_are_well_formed() -> None:
    objects = render_scenario("monitoring-values.yaml")
    rules = _rules(objects)
    alerts = {rule["alert"]: rule for rule in rules}
    assert len(alerts) == len(rules), "every rule is an alert with a unique name"
    assert set(alerts) >= EXPECTED_ALERTS
    for name, rule in alerts.items():
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert _balanced(rule["expr"]), name
        assert "{{" not in rule["expr"], f"{name}: unrendered template in expr"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert PROMETHEUS_DURATION.match(str(rule.get("for", "0"))), name
    selector = f'job="{FULLNAME}",namespace="{NAMESPACE}"'
    for name in EXPECTED_ALERTS:
        assert selector in alerts[name]["expr"], name
        assert alerts[name]["labels"]["team"] == "telematics", name


def test_alert_expressions_use_the_mirror_metrics_and_thresholds() -> None:
    alerts = {
        rule["alert"]: rule["expr"] for rule in _rules(render_scenario("monitoring-values.yaml"))
    }
    assert re.search(r"\bup\{[^}]*\} == 0", alerts["FlespiMirrorDown"])
    assert "flespi_mirror_ready{" in alerts["FlespiMirrorNotReady"]
    assert alerts["FlespiMirrorNotReady"].endswith("== 0")
    assert alerts["FlespiMirrorLagHigh"].startswith(
        "histogram_quantile(0.99, sum by (le) (rate(flespi_mirror_lag_seconds_bucket{"
    )
    assert alerts["FlespiMirrorLagHigh"].endswith("[5m]))) > 30")  # the ci file's threshold
    assert alerts["FlespiMirrorDeadLettersRising"].startswith(
        "rate(flespi_mirror_dead_letters_total{"
    )
    assert alerts["FlespiMirrorDeadLettersRising"].endswith("[10m]) > 0")
    assert alerts["FlespiMirrorNoCommits"].startswith(
        "time() - flespi_mirror_last_commit_timestamp_seconds{"
    )
    assert alerts["FlespiMirrorNoCommits"].endswith("> 1800")
    assert alerts["FlespiMirrorReconnectStorm"].startswith(
        "increase(flespi_mirror_reconnects_total{"
    )
    assert alerts["FlespiMirrorReconnectStorm"].endswith("[10m]) > 5")
    assert f'job="{FULLNAME}"' in alerts["FlespiMirrorMemoryHigh"], "additionalRules go through tpl"


def test_alerts_can_be_switched_off_one_by_one() -> None:
    values = {"prometheusRule": {"enabled": True, "alerts": {"reconnectStorm": {"enabled": False}}}}
    alerts = {rule["alert"] for rule in _rules(parse_manifests(render_templates(values)))}
    assert alerts == EXPECTED_ALERTS - {"FlespiMirrorReconnectStorm"}


def test_service_monitor_scrapes_the_metrics_port_of_the_service() -> None:
    objects = render_scenario("monitoring-values.yaml")
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert PROMETHEUS_DURATION.match(endpoint["interval"])
    assert PROMETHEUS_DURATION.match(endpoint["scrapeTimeout"])
    # The alerts select job="<Service name>", the job label a ServiceMonitor gives its targets.
    assert service["metadata"]["name"] == FULLNAME


def test_pod_disruption_budget_is_optional() -> None:
    assert by_kind(render_scenario("chart-defaults"), "PodDisruptionBudget") == []
    pdb = only(render_scenario("pdb-values.yaml"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]


def test_notes_warn_when_no_credentials_are_given() -> None:
    assert "WARNING" in render_templates()["flespi-mirror/templates/NOTES.txt"]
    notes = render_templates(ci_values("existing-secret-values.yaml"))
    assert "WARNING" not in notes["flespi-mirror/templates/NOTES.txt"]


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per build stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
        else:
            assert keyword == "ARG", f"only ARG may precede the first FROM, not {keyword}"
    return stages


@pytest.fixture(scope="module")
def docker_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _global_args(text: str) -> dict[str, str]:
    args = {}
    for line in text.splitlines():
        if line.startswith("FROM"):
            break
        match = re.match(r"^ARG\s+(\w+)=(\S+)", line)
        if match:
            args[match.group(1)] = match.group(2)
    return args


def test_dockerfile_is_multi_stage_on_slim_python_311(docker_stages: list[Stage]) -> None:
    assert len(docker_stages) >= 2
    build, final = docker_stages[0], docker_stages[-1]
    assert build.name, "the build stage is named so the final stage can copy from it"
    args = _global_args(DOCKERFILE.read_text())
    for stage in (build, final):
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    build_runs = " ".join(build.args_of("RUN"))
    assert "pip wheel" in build_runs and "--wheel-dir /wheels" in build_runs


def test_final_stage_installs_only_the_prebuilt_wheels(docker_stages: list[Stage]) -> None:
    build, final = docker_stages[0], docker_stages[-1]
    runs = " ".join(final.args_of("RUN"))
    assert re.search(r"pip install [^&]*--no-index", runs), "no index: only the built wheels"
    assert f"from={build.name}" in runs or any(
        f"--from={build.name}" in copy for copy in final.args_of("COPY")
    )
    forbidden = r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3-dev|libpq-dev|hatchling)\b"
    for keyword, args in final.instructions:
        assert not re.search(forbidden, args), f"build tooling in the final stage: {keyword} {args}"
    assert not re.search(r"pip wheel|python -m build", runs)
    # Nothing copied from the build context: the final image gets the wheels and nothing else.
    assert not any("--from" not in copy for copy in final.args_of("COPY") + final.args_of("ADD"))


def test_final_stage_runs_flespi_mirror_as_a_numeric_non_root_user(
    docker_stages: list[Stage],
) -> None:
    final = docker_stages[-1]
    users = final.args_of("USER")
    assert users, "the final stage must switch to a non-root USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric UID, so runAsNonRoot can verify it"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert json.loads(final.args_of("ENTRYPOINT")[-1]) == ["flespi-mirror"]
    assert json.loads(final.args_of("CMD")[-1]) == ["run"]
    # The chart's pod security context names the same user.
    values = default_values()
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["securityContext"]["runAsUser"] == int(uid)


def test_final_stage_environment_and_port_match_the_chart(docker_stages: list[Stage]) -> None:
    final = docker_stages[-1]
    env: dict[str, str] = {}
    for args in final.args_of("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    port = default_values()["config"]["metricsPort"]
    assert final.args_of("EXPOSE") == [str(port)]
    assert env["MIRROR_METRICS_PORT"] == str(port)


def test_dockerignore_keeps_the_build_context_to_the_package() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: exclude everything, then re-include the package"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "mirror", "migrations"}
    copied = {
        word.rstrip("/").removeprefix("./")
        for stage in parse_dockerfile(DOCKERFILE.read_text())
        for copy in stage.args_of("COPY")
        if "--from" not in copy
        for word in copy.split()[:-1]
    }
    assert copied <= included, "the Dockerfile copies something .dockerignore leaves out"


def test_accounts_to_mirror_reach_the_daemon_as_one_list() -> None:
    env = env_of(daemon_container(parse_manifests(render_templates({"config": {"cids": [7, 42]}}))))
    assert env["MIRROR_CIDS"]["value"] == "7,42"
    assert "MIRROR_CIDS" not in env_of(daemon_container(render_scenario("chart-defaults")))
    with pytest.raises(HelmCallError, match="cids"):
        validate_schema({"config": {"cids": ["all"]}})
