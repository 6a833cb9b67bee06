"""Tests over the Helm chart's rendered manifests and the container files.

Run by scripts/helm-check, which renders the chart into $RENDERED (default
values as default.yaml, each helm/examples/*.yaml under its own name) and
passes the helm binary ($HELM) and the debug binaries ($TESSERA_BIN_DIR).
"""

import os
import re
import subprocess
import tempfile
import tomllib
import unittest
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tessera"
RENDERED = Path(os.environ["RENDERED"])
HELM = os.environ["HELM"]
BIN_DIR = Path(os.environ["TESSERA_BIN_DIR"])
ROLE_BINARIES = {
    "room-worker": "tessera-room-worker",
    "client-api": "tessera-client-api",
    "sync-worker": "tessera-sync-worker",
    "federation-receiver": "tessera-federation-receiver",
}


def manifests(name):
    with open(RENDERED / f"{name}.yaml") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(doc):
    return doc["metadata"]["labels"].get("app.kubernetes.io/component")


def helm_template(*args):
    return subprocess.run(
        [HELM, "template", "tessera", str(CHART), *args],
        capture_output=True,
        text=True,
    )


def binaries_built():
    """[[bin]] names of the workspace's service crates."""
    names = set()
    for cargo in (ROOT / "services").glob("*/Cargo.toml"):
        text = cargo.read_text()
        for block in text.split("[[bin]]")[1:]:
            match = re.search(r'name\s*=\s*"([^"]+)"', block)
            if match:
                names.add(match.group(1))
    return names


class RenderedChart(unittest.TestCase):
    def test_every_example_renders_every_role(self):
        for name in ["default", "minimal", "large-operator", "external-secrets"]:
            deployments = by_kind(manifests(name), "Deployment")
            self.assertEqual(
                sorted(component(d) for d in deployments.values()),
                sorted(ROLE_BINARIES),
                name,
            )

    def test_containers_run_their_role_with_probes_on_the_health_endpoints(self):
        for name in ["default", "large-operator"]:
            for deployment in by_kind(manifests(name), "Deployment").values():
                role = component(deployment)
                pod = deployment["spec"]["template"]["spec"]
                (container,) = pod["containers"]
                self.assertEqual(container["command"], [ROLE_BINARIES[role]])
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                for probe, path in [
                    ("startupProbe", "/health/ready"),
                    ("readinessProbe", "/health/ready"),
                    ("livenessProbe", "/health/live"),
                ]:
                    self.assertEqual(container[probe]["httpGet"]["path"], path, (role, probe))
                    self.assertEqual(container[probe]["httpGet"]["port"], "admin")
                self.assertIn("admin", ports)
                self.assertIn("requests", container["resources"], role)
                self.assertIn("limits", container["resources"], role)
                self.assertTrue(pod["securityContext"]["runAsNonRoot"])
                self.assertTrue(container["securityContext"]["readOnlyRootFilesystem"])

    def test_room_workers_drain_within_their_grace_period(self):
        docs = manifests("large-operator")
        (worker,) = [d for d in by_kind(docs, "Deployment").values() if component(d) == "room-worker"]
        pod = worker["spec"]["template"]["spec"]
        config = tomllib.loads(by_kind(docs, "ConfigMap")["tessera-config"]["data"]["tessera.toml"])
        drain_s = config["room_worker"]["drain_timeout_ms"] / 1000
        self.assertEqual(drain_s, 30)
        self.assertGreater(pod["terminationGracePeriodSeconds"], drain_s)
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        self.assertEqual(env["TESSERA_ROOM_WORKER__WORKER_ID"], "$(POD_NAME)")
        self.assertEqual(env["TESSERA_ROOM_WORKER__ADVERTISE"], "$(POD_IP):9101")

    def test_replicas_autoscalers_and_disruption_budgets(self):
        docs = manifests("large-operator")
        deployments = {component(d): d for d in by_kind(docs, "Deployment").values()}
        self.assertEqual(deployments["room-worker"]["spec"]["replicas"], 12)
        hpas = {component(h): h["spec"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
        self.assertEqual(sorted(hpas), ["client-api", "federation-receiver", "sync-worker"])
        self.assertEqual((hpas["sync-worker"]["minReplicas"], hpas["sync-worker"]["maxReplicas"]), (6, 60))
        for role in hpas:
            # The autoscaler owns the replica count of what it scales.
            self.assertNotIn("replicas", deployments[role]["spec"], role)
        pdbs = {component(p): p["spec"] for p in by_kind(docs, "PodDisruptionBudget").values()}
        self.assertEqual(sorted(pdbs), sorted(ROLE_BINARIES))
        self.assertEqual(pdbs["room-worker"]["maxUnavailable"], 2)
        self.assertEqual(pdbs["sync-worker"]["maxUnavailable"], "25%")
        # By default only the receiver and sync-worker autoscale.
        default_hpas = {component(h) for h in by_kind(manifests("default"), "HorizontalPodAutoscaler").values()}
        self.assertEqual(default_hpas, {"sync-worker", "federation-receiver"})

    def test_ingress_routes_each_path_to_its_role(self):
        docs = manifests("large-operator")
        routes = {}
        for ingress in by_kind(docs, "Ingress").values():
            for rule in ingress["spec"]["rules"]:
                self.assertEqual(rule["host"], "matrix.chat.example.org")
                for path in rule["http"]["paths"]:
                    routes[(path["path"], path["pathType"])] = path["backend"]["service"]["name"]
        self.assertEqual(
            routes,
            {
                ("/_matrix/client/v3/sync", "Exact"): "tessera-sync-worker",
                ("/_matrix/client/r0/sync", "Exact"): "tessera-sync-worker",
                ("/_matrix/federation", "Prefix"): "tessera-federation-receiver",
                ("/_matrix/key", "Prefix"): "tessera-federation-receiver",
                ("/_matrix", "Prefix"): "tessera-client-api",
                ("/_synapse", "Prefix"): "tessera-client-api",
                ("/.well-known/matrix", "Prefix"): "tessera-client-api",
            },
        )
        sync = by_kind(docs, "Ingress")["tessera-sync"]
        self.assertEqual(
            sync["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"],
            "$http_authorization",
            "sync requests are pinned by access token",
        )

    def test_http_route_routes_each_path_to_its_role(self):
        (route,) = by_kind(manifests("external-secrets"), "HTTPRoute").values()
        self.assertEqual(route["spec"]["hostnames"], ["matrix.example.net"])
        routes = {}
        for rule in route["spec"]["rules"]:
            (backend,) = rule["backendRefs"]
            for match in rule["matches"]:
                routes[(match["path"]["type"], match["path"]["value"])] = backend["name"]
        self.assertEqual(routes[("Exact", "/_matrix/client/v3/sync")], "tessera-sync-worker")
        self.assertEqual(routes[("PathPrefix", "/_matrix/federation")], "tessera-federation-receiver")
        self.assertEqual(routes[("PathPrefix", "/_matrix/key")], "tessera-federation-receiver")
        self.assertEqual(routes[("PathPrefix", "/_matrix")], "tessera-client-api")
        self.assertEqual(routes[("PathPrefix", "/.well-known/matrix")], "tessera-client-api")

    def test_an_existing_secret_replaces_the_charts(self):
        docs = manifests("external-secrets")
        secrets = by_kind(docs, "Secret")
        self.assertEqual(secrets, {}, "the chart makes no Secret")
        for deployment in by_kind(docs, "Deployment").values():
            env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            self.assertEqual(set(refs.values()), {"tessera-credentials"})
            self.assertIn("TESSERA_DATABASE__URL", refs)

    def test_extra_environment_reaches_every_pod(self):
        result = helm_template(
            "--set", "extraEnv[0].name=MALLOC_ARENA_MAX",
            "--set-string", "extraEnv[0].value=2",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
        self.assertGreaterEqual(len(pods), 5)
        for pod in pods:
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            self.assertEqual(env["MALLOC_ARENA_MAX"], {"name": "MALLOC_ARENA_MAX", "value": "2"})
            self.assertIn("TESSERA_DATABASE__URL", env, "the chart's own stay")
        refused = helm_template("--set", "extraEnv[0].value=2")
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("name is required", refused.stderr)

    def test_migrations_run_as_a_pre_upgrade_hook_with_their_own_copies(self):
        docs = manifests("minimal")
        job = by_kind(docs, "Job")["tessera-migrate"]
        self.assertEqual(job["metadata"]["annotations"]["helm.sh/hook"], "pre-install,pre-upgrade")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        self.assertEqual(container["command"], ["tessera-room-worker", "--migrate-only"])
        hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
        self.assertEqual(sorted(d["kind"] for d in hooks), ["ConfigMap", "Job", "Secret"])
        weight = lambda d: int(d["metadata"]["annotations"]["helm.sh/hook-weight"])
        self.assertTrue(all(weight(d) < weight(job) for d in hooks if d is not job))
        # The roles then do not migrate on start.
        config = tomllib.loads(by_kind(docs, "ConfigMap")["tessera-config"]["data"]["tessera.toml"])
        self.assertFalse(config["database"]["migrate_on_start"])

    def test_the_rendered_configuration_loads_in_the_real_binary(self):
        for name in ["default", "minimal", "large-operator", "external-secrets"]:
            toml = by_kind(manifests(name), "ConfigMap")["tessera-config"]["data"]["tessera.toml"]
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
                f.write(toml)
                f.flush()
                for binary in ROLE_BINARIES.values():
                    result = subprocess.run(
                        [str(BIN_DIR / binary), "--config", f.name, "--check-config"],
                        capture_output=True,
                        text=True,
                        env={"PATH": os.environ.get("PATH", "")},
                    )
                    self.assertEqual(result.returncode, 0, f"{name} {binary}: {result.stdout}{result.stderr}")

    def test_the_schema_refuses_unknown_keys_and_wrong_types(self):
        for args, expected in [
            (["--set", "bogus=1"], "Additional property bogus is not allowed"),
            (["--set", "roomWorker.replicaz=3"], "Additional property replicaz is not allowed"),
            (["--set-string", "roomWorker.replicas=two"], "Expected: integer"),
            (["--set", "syncWorker.autoscaling.enabled=maybe"], "Expected: boolean"),
            (["--set", "log.format=xml"], "log.format"),
            (["--set", "secrets.signingKey=not-a-key"], "secrets.signingKey"),
        ]:
            result = helm_template(*args)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(expected, result.stderr, args)
        self.assertEqual(helm_template("--set", "roomWorker.replicas=3").returncode, 0)

    def test_required_values_have_clear_messages(self):
        result = helm_template("--set", "postgres.url=")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("postgres.url is required", result.stderr)
        result = helm_template("--set", "ingress.enabled=true")
        self.assertIn("ingress.host is required", result.stderr)


class ContainerFiles(unittest.TestCase):
    def test_the_dockerfile_copies_and_builds_what_exists(self):
        dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
        built = binaries_built()
        named = set(re.findall(r"\btessera-[a-z-]+\b", dockerfile))
        self.assertTrue(named, "the Dockerfile names the binaries")
        self.assertTrue(named <= built, f"unknown binaries: {named - built}")
        self.assertEqual(set(re.findall(r"--bin (\S+)", dockerfile)), built, "every role is built")
        for line in dockerfile.splitlines():
            if line.startswith("COPY") and "--from" not in line:
                sources = line.split()[1:-1]
                for source in sources:
                    self.assertTrue((ROOT / source).exists(), f"COPY source {source} is missing")
        members = re.findall(r'^\s*"([^"]+)",', (ROOT / "Cargo.toml").read_text(), re.M)
        copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY") and "--from" not in line}
        for member in members:
            self.assertTrue(
                any(member == c or member.startswith(c.rstrip("/") + "/") for c in copied),
                f"workspace member {member} is not copied into the build",
            )

    def test_the_compose_file_runs_existing_binaries(self):
        compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
        built = binaries_built()
        roles = set()
        for name, service in compose["services"].items():
            if "command" in service:
                self.assertIn(service["command"][0], built, name)
                roles.add(service["command"][0])
        self.assertEqual(roles, built, "every role runs in the compose cluster")

    def test_the_chart_runs_existing_binaries(self):
        built = binaries_built()
        for docs in [manifests("default"), manifests("large-operator")]:
            for doc in docs:
                if doc["kind"] in ("Deployment", "Job"):
                    for container in doc["spec"]["template"]["spec"]["containers"]:
                        self.assertIn(container["command"][0], built)


class Dashboard(unittest.TestCase):
    def test_every_metric_on_the_dashboard_is_one_the_code_exports(self):
        import json

        dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
        exported = set()
        for source in (ROOT / "services").glob("*/src/**/*.rs"):
            exported |= set(re.findall(r'"(tessera_[a-z_]+)"', source.read_text()))
        used = set()
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                for name in re.findall(r"\b(tessera_[a-z_]+)", target["expr"]):
                    # Histograms are queried through their _bucket series.
                    used.add(re.sub(r"_bucket$", "", name))
        self.assertTrue(used, "the dashboard queries metrics")
        self.assertEqual(used - exported, set(), "metrics the code does not export")


if __name__ == "__main__":
    unittest.main()
