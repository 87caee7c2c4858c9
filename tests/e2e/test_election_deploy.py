"""deploy/kubernetes/replicated: the pieces of the elected 3-pod group fit together.

Parsed, not applied (no cluster here): names, ports, the probe path brokerd serves, the RBAC
the election needs, and brokerd's own parser and config checks accept the pod's flags.
"""

from __future__ import annotations

import re

import pytest
import yaml

from broker.config import KUBE_LEASE_NAME, load, parse_election
from broker.runtime.http import ROUTES
from tests.e2e.test_deploy import DEPLOY, brokerd_args

HERE = DEPLOY / "kubernetes" / "replicated"


@pytest.fixture(scope="module")
def docs():
    out: dict = {}
    for path in sorted(HERE.glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                out.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    return out


def pod_of(docs):
    sts = docs["StatefulSet"]["brokerd"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, sts["spec"]["template"]["spec"], c


def test_three_pods_elected_by_a_kubernetes_lease_with_their_headless_names(docs):
    sts, pod, c = pod_of(docs)
    assert sts["spec"]["replicas"] == 3
    # a follower is never ready: ordered start and rolling updates would wait for it forever
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    args = brokerd_args(c["args"])
    assert parse_election(args.election) == ("kubernetes", KUBE_LEASE_NAME)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"proto": int(args.port), "http": int(args.http_port)}
    # --advertise is the pod's name under the headless Service, on the protocol port
    env = {e["name"]: e for e in c["env"]}
    host, port = args.advertise.rsplit(":", 1)
    assert int(port) == ports["proto"]
    assert host == f"$(POD_NAME).{sts['spec']['serviceName']}.$(POD_NAMESPACE).svc"
    for var in re.findall(r"\$\((\w+)\)", args.advertise):  # Kubernetes expands $(VAR) from env
        assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] in ("metadata.name", "metadata.namespace")
    # the follower's login: a user of brokerd-users, its token from the replication Secret
    assert args.follow_user and env["BROKERD_FOLLOW_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] in docs["Secret"]
    assert int(args.sync_replicas) >= 1  # a follower elected after a loss has every confirmed write
    # brokerd's own checks accept these settings (TLS files exist only in the pod)
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("config", "tls_cert", "tls_key", "tls_required")}
    config = load(None, env={}, overrides={**overrides, "advertise": "brokerd-0.brokerd-headless.ns.svc:7700"})
    assert config.election == "kubernetes" and config.exposure_refusal() is None
    assert 2 <= config.election_ttl <= 10


def test_only_the_leader_is_ready_so_the_service_points_at_it(docs):
    sts, pod, c = pod_of(docs)
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready/leader" and probe["path"] in ROUTES
    assert probe["port"] == "http" and probe["scheme"] == "HTTPS"
    for name in ("startupProbe", "livenessProbe"):  # liveness must not kill a healthy follower
        assert c[name]["httpGet"]["path"] == "/healthz"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    services = docs["Service"]
    leader_svc, headless = services["brokerd"]["spec"], services[sts["spec"]["serviceName"]]["spec"]
    assert not leader_svc.get("publishNotReadyAddresses") and leader_svc["type"] == "ClusterIP"
    # followers replicate from the advertised per-pod names, ready or not
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    for s in (leader_svc, headless):
        assert s["selector"].items() <= labels.items()
        for p in s["ports"]:
            assert ports[p["targetPort"]] == p["port"]


def test_the_pods_service_account_may_get_create_and_update_its_lease_and_nothing_else(docs):
    sts, pod, c = pod_of(docs)
    sa = pod["serviceAccountName"]
    assert sa in docs["ServiceAccount"] and pod.get("automountServiceAccountToken", True) is True
    (binding,) = docs["RoleBinding"].values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    role = docs["Role"][binding["roleRef"]["name"]]
    assert binding["roleRef"]["kind"] == "Role"
    verbs: dict[str, set] = {}
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
        for verb in rule["verbs"]:
            verbs.setdefault(verb, set()).update(rule.get("resourceNames", ["*"]))
    assert set(verbs) == {"get", "create", "update"}
    assert verbs["get"] == verbs["update"] == {KUBE_LEASE_NAME}
