"""deploy/ checked against what brokerd serves.

Every manifest is parsed (YAML with PyYAML, TOML with tomllib, unit files and
the Dockerfile with the small readers below), and each port, path, flag and
probe endpoint it names is compared with the code: flags must parse with the
real argument parsers, ports must be Config's defaults, probe and scrape paths
must be routes of broker/http.py, metric names in alerts and queries must be
metrics brokerd exports.  ``systemd-analyze verify`` and ``promtool`` run when
they are installed and are skipped (with the reason) when not.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import cbor2
import pytest
import yaml

from broker import cli
from broker.runtime import http as broker_http
from broker.config import Config, ConfigError, load
from broker.runtime.durability import Durability
from broker.runtime.server import Server
from broker.state import BrokerState
from broker.wal import WriteAheadLog
from client import Client, worker_cli
from client.errors import AuthFailed
from client.options import broker_url
from client.userfile import hash_token, user_entry
from tests.support.broker import ROOT, BrokerProcess, admin_exchange
from tests.support.certs import make_pki
from tests.runtime.test_http import start, value_location

DEPLOY = ROOT / "deploy"
TOKEN = "deploy-test-token-of-worker"  # the test users file's worker token
DEFAULTS = Config().validate()  # validated: unset settings (sync_replicas) resolved
ROUTES = set(broker_http.ROUTES)


# -- readers ------------------------------------------------------------------------------
def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: {section: {key: [values, in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: cannot read line {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, (key, values)
    return values[0]


def seconds(systemd_time: str) -> float:
    units = {"min": 60, "s": 1, "sec": 1, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", systemd_time):
        total += float(number) * units[unit or "s"]
    return total


def read_dockerfile(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line.strip(), ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def brokerd_args(argv: list[str]):
    """Parse with brokerd's own parser; a flag it does not know fails the test."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"brokerd does not accept {argv}")


def worker_args(argv: list[str]):
    try:
        return worker_cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"brokerd-worker does not accept {argv}")


def console_scripts() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory) -> set[str]:
    """Every sample name brokerd's /metrics has, for a server with a log and a queue."""
    from prometheus_client.parser import text_string_to_metric_families

    d = tmp_path_factory.mktemp("metrics")
    wal = WriteAheadLog(str(d), fsync="never")
    state = BrokerState()
    state.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in wal.open()), 0.0)
    state.connect(1)
    state.publish(1, "emails", b"x", None, 0, 1.0)
    config = Config(data_dir=str(d))
    server = Server(config, state, Durability(wal, state, config))
    names = set()
    for fam in text_string_to_metric_families(broker_http.render_metrics(server, 2.0)):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    wal.close()
    return names


def metric_names_in(promql: str) -> set[str]:
    return set(re.findall(r"\bbrokerd_[a-z0-9_]+", promql))


# -- every file is accounted for -------------------------------------------------------------
def test_every_file_in_deploy_is_documented_in_its_readme():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md":
            rel = path.relative_to(DEPLOY).as_posix()
            assert rel in readme, f"deploy/{rel} is not mentioned in deploy/README.md"


# -- systemd ----------------------------------------------------------------------------------
# What the production deploy files set apart from the defaults: an address other machines reach,
# made safe by users over TLS only.
PROTECTED = {"host": "0.0.0.0", "tls_required": True}
SECRET_SETTINGS = ("tls_cert", "tls_key", "users_file")


def example_config(tmp_path) -> tuple[Path, dict]:
    """brokerd.toml.example with /etc/brokerd/ moved under tmp_path, and the files it names
    made there (test certificates, a users file): {setting: path}."""
    text = (DEPLOY / "systemd" / "brokerd.toml.example").read_text()
    named = {k: v for k, v in tomllib.loads(text).items() if k in SECRET_SETTINGS}
    assert all(v.startswith("/etc/brokerd/") for v in named.values()), named
    etc = tmp_path / "etc-brokerd"
    pki = make_pki(tmp_path / "pki")
    sources = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    moved = {}
    for name, path in named.items():
        target = etc / path.removeprefix("/etc/brokerd/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "users_file":
            target.write_text(user_entry("worker", hash_token(TOKEN), {"consume": ["*"], "publish": ["*"]}))
        else:
            shutil.copy(sources[name], target)
        moved[name] = str(target)
    path = tmp_path / "brokerd.toml"
    path.write_text(text.replace("/etc/brokerd/", f"{etc}/"))
    return path, {**named, "ca": pki.ca, "moved": moved}


def test_the_example_config_loads_names_every_setting_and_asks_for_tls_and_users(tmp_path):
    path, files = example_config(tmp_path)
    config = load(str(path), env={})
    assert config == dataclasses.replace(DEFAULTS, data_dir="/var/lib/brokerd", **PROTECTED, **files["moved"])
    assert config.exposure_refusal() is None and config.security() == "users" and not config.insecure_no_auth
    written = set(tomllib.loads(path.read_text()))
    assert written == {f.name for f in dataclasses.fields(Config)}
    # as shipped (the files not made yet) it refuses to load, naming the missing file
    with pytest.raises(ConfigError, match="tls_cert: file '/etc/brokerd/tls/server.pem' does not exist"):
        load(str(DEPLOY / "systemd" / "brokerd.toml.example"), env={})


def test_brokerd_service_hands_the_configs_tls_and_users_files_over_as_credentials():
    unit = read_unit(DEPLOY / "systemd" / "brokerd.service")
    named = tomllib.loads((DEPLOY / "systemd" / "brokerd.toml.example").read_text())
    creds = dict(c.split(":", 1) for c in unit["Service"]["LoadCredential"])
    args = brokerd_args(shlex.split(one(unit, "Service", "ExecStart"))[1:])
    for setting, flag_value in ((s, getattr(args, s)) for s in SECRET_SETTINGS):
        assert flag_value.startswith("%d/"), (setting, flag_value)  # %d: the credentials directory
        # the flag names a credential that systemd loads from the file the config names
        assert creds[flag_value.removeprefix("%d/")] == named[setting], setting
    assert args.insecure_no_auth is None


def test_worker_unit_takes_a_brokerds_url_from_its_environment_file():
    path = DEPLOY / "systemd" / "brokerd-worker@.service"
    unit = read_unit(path)
    env_file = one(unit, "Service", "EnvironmentFile")
    assert not env_file.startswith("-"), "without the file the worker has no user to log in as"
    shown = re.search(r"BROKERD_URL=(\S+?)\\n", path.read_text()).group(1)  # the install comment's example
    url = broker_url(shown)
    assert url.tls and url.user == "worker" and url.ca == "/etc/brokerd/tls/ca.pem", url
    assert env_file == "/etc/brokerd/worker.env"


def test_brokerd_service_is_type_notify_hardened_and_runs_flags_brokerd_accepts():
    unit = read_unit(DEPLOY / "systemd" / "brokerd.service")
    s = "Service"
    assert one(unit, s, "Type") == "notify"
    assert one(unit, s, "NotifyAccess") == "main"
    # The watchdog is fed every WatchdogSec/2 while healthy; a wedged writer is
    # declared at WRITER_STALL_LIMIT, and a healthy one must never miss a ping.
    assert seconds(one(unit, s, "WatchdogSec")) == 30
    assert seconds(one(unit, s, "TimeoutStartSec")) >= 15 * 60
    assert seconds(one(unit, s, "TimeoutStopSec")) == 60
    assert one(unit, s, "Restart") == "on-failure"
    assert set(one(unit, s, "RestartPreventExitStatus").split()) == {str(cli.EXIT_USAGE), str(cli.EXIT_DATA)}
    assert one(unit, s, "DynamicUser") == "yes" or "User" in unit[s]
    state_dir = one(unit, s, "StateDirectory")
    assert state_dir == "brokerd"
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "", "UMask": "0077",
        "LimitNOFILE": "65536",
    }
    for key, value in hardening.items():
        assert one(unit, s, key) == value, key
    argv = shlex.split(one(unit, s, "ExecStart"))
    assert argv[0] == "/opt/brokerd/bin/brokerd" and "brokerd" in console_scripts()
    args = brokerd_args(argv[1:])
    assert args.data_dir == f"/var/lib/{state_dir}"
    assert args.config == f"/etc/{one(unit, s, 'ConfigurationDirectory')}/brokerd.toml"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_worker_template_unit_runs_the_instance_app_and_outlasts_its_grace():
    unit = read_unit(DEPLOY / "systemd" / "brokerd-worker@.service")
    s = "Service"
    argv = shlex.split(one(unit, s, "ExecStart"))
    assert argv[0] == "/opt/brokerd/bin/brokerd-worker" and "brokerd-worker" in console_scripts()
    assert argv[1] == "%I"  # the instance name: brokerd-worker@proj.tasks:app.service
    assert argv[-1] == "$WORKER_ARGS"
    args = worker_args(["proj.tasks:app", *argv[2:-1]])
    assert seconds(one(unit, s, "TimeoutStopSec")) > args.grace
    assert one(unit, s, "KillSignal") == "SIGTERM"
    assert one(unit, s, "KillMode") == "mixed"
    assert one(unit, s, "RestartPreventExitStatus") == str(worker_cli.EXIT_USAGE)


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    bindir = Path(sys.executable).parent
    if not (bindir / "brokerd").exists() or not (bindir / "brokerd-worker").exists():
        pytest.skip(f"the brokerd console scripts are not installed in {bindir} (pip install -e .)")
    # verify checks that ExecStart's program exists: point it at this install.
    for name in ("brokerd.service", "brokerd-worker@.service"):
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/brokerd/bin/", f"{bindir}/")
        (tmp_path / name).write_text(text)
        r = subprocess.run(
            [analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60,
        )
        # verify exits 0 even for an unknown key or a bad value, but prints them
        noise = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        assert r.returncode == 0 and not noise, f"{name}:\n" + "\n".join(noise)


# -- docker -----------------------------------------------------------------------------------
def test_dockerfile_runs_brokerd_as_pid_1_non_root_with_a_volume_and_a_health_check():
    path = DEPLOY / "docker" / "Dockerfile"
    ins = read_dockerfile(path)
    stages = [rest for word, rest in ins if word == "FROM"]
    assert len(stages) == 2 and stages[-1] == "python:3.11-slim", stages
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    get = lambda word: [rest for w, rest in final if w == word]  # noqa: E731
    user = get("USER")[-1]
    assert user.split(":")[0] == "10001"
    assert "PYTHONUNBUFFERED=1" in " ".join(get("ENV"))
    assert json.loads(get("ENTRYPOINT")[-1]) == ["brokerd"]  # exec form: SIGTERM reaches brokerd
    args = brokerd_args(json.loads(get("CMD")[-1]))
    assert args.host == "0.0.0.0"
    assert get("VOLUME") == [args.data_dir]
    assert {int(p) for p in get("EXPOSE")[-1].split()} == {DEFAULTS.port, DEFAULTS.http_port}
    assert get("STOPSIGNAL") == ["SIGTERM"]
    for w, rest in ins:  # every COPY source from the build context exists
        if w == "COPY" and not rest.startswith("--from"):
            for src in [w for w in rest.split()[:-1] if not w.startswith("--")]:
                assert (ROOT / src).exists(), src
    hc = get("HEALTHCHECK")[-1]
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())  # exec form: no shell needed
    if cmd[0] == "brokerd-ctl":
        assert "brokerd-ctl" in console_scripts()
    else:
        url = urlsplit(re.search(r"https://[^'\"]+", " ".join(cmd)).group(0))  # TLS is on: HTTPS only
        assert url.port == DEFAULTS.http_port and url.path == "/healthz"
        assert "cafile='/etc/brokerd/tls/ca.pem'" in " ".join(cmd)


def test_the_docker_health_check_command_passes_on_a_live_tls_brokerd_and_fails_without_one(broker_factory, tmp_path):
    hc = [rest for w, rest in read_dockerfile(DEPLOY / "docker" / "Dockerfile") if w == "HEALTHCHECK"][-1]
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert cmd[0] == "python", "the health check is not the python probe"
    pki = make_pki(tmp_path / "pki")
    b = start(broker_factory, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-required")

    def probe(port):
        argv = [a.replace(f":{DEFAULTS.http_port}/", f":{port}/").replace("/etc/brokerd/tls/ca.pem", pki.ca)
                for a in cmd]
        return subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=20)

    r = probe(b.http_port)
    assert r.returncode == 0, r.stderr
    http_port = b.http_port
    b.terminate()
    assert probe(http_port).returncode != 0


def test_compose_runs_brokerd_two_workers_the_web_app_and_prometheus():
    compose = yaml_docs("docker/compose.yaml")[0]
    here = DEPLOY / "docker"
    services = compose["services"]
    assert set(services) == {"init", "brokerd", "worker-1", "worker-2", "web", "prometheus"}
    b = services["brokerd"]
    assert (here / b["build"]["context"] / b["build"]["dockerfile"]).resolve() == (here / "Dockerfile").resolve()
    args = brokerd_args(b["command"])
    assert (int(args.port), int(args.http_port)) == (DEFAULTS.port, DEFAULTS.http_port)
    published = {int(p.rsplit(":", 1)[1]) for p in b["ports"]}
    assert published == {DEFAULTS.port, DEFAULTS.http_port}
    assert any(v.split(":")[1] == args.data_dir for v in b["volumes"])
    # the init service fills the secrets volume before brokerd starts, and brokerd reads it there
    init = services["init"]
    assert init["entrypoint"][0] == "brokerd-init-secrets"
    secrets_dir = init["entrypoint"][1]
    secrets_volume = next(v.split(":")[0] for v in init["volumes"] if v.split(":")[1] == secrets_dir)
    assert b["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert f"{secrets_volume}:{secrets_dir}:ro" in b["volumes"] and secrets_volume in compose["volumes"]
    for path in (args.tls_cert, args.tls_key, args.users_file):
        assert path.startswith(secrets_dir + "/"), path
    assert args.tls_required and not args.insecure_no_auth
    for name, user in (("worker-1", "worker"), ("worker-2", "worker"), ("web", "webapp")):
        s = services[name]
        script = s["entrypoint"][2]
        assert s["entrypoint"][:2] == ["sh", "-c"] and script.startswith(f"set -a && . {secrets_dir}/{user}.env && exec ")
        assert f"{secrets_volume}:{secrets_dir}:ro" in s["volumes"]
        assert "BROKERD_URL" not in s.get("environment", {})  # only from the env file: no token in compose
        assert s["depends_on"]["brokerd"]["condition"] == "service_healthy"
    for name in ("worker-1", "worker-2"):
        w = services[name]
        assert w["entrypoint"][2].endswith('exec brokerd-worker "$@"') and w["entrypoint"][3] == "brokerd-worker"
        wargs = worker_args(w["command"])
        assert wargs.app == "examples.tasks:app" and (ROOT / "examples" / "tasks.py").exists()
        assert seconds(w["stop_grace_period"]) > wargs.grace
    for name in ("worker-1", "worker-2", "web"):
        for v in services[name]["volumes"]:
            if v.split(":")[0] not in compose["volumes"]:
                assert (here / v.split(":")[0]).resolve().exists(), v
    web = services["web"]
    assert "from examples.web import main; main('0.0.0.0', 8000)" in web["entrypoint"][2]
    assert any(p.endswith(":8000") for p in web["ports"])
    prom = services["prometheus"]
    mounted = {v.split(":")[1]: here / v.split(":")[0] for v in prom["volumes"]}
    config = mounted["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(config.read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] in ROUTES
    assert scrape["static_configs"][0]["targets"] == [f"brokerd:{DEFAULTS.http_port}"]
    # HTTPS, trusting the init service's CA from the mounted secrets volume
    assert scrape["scheme"] == "https"
    assert scrape["tls_config"]["ca_file"] == f"{secrets_dir}/tls/ca.pem" and secrets_dir in mounted


# -- kubernetes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s():
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                docs.setdefault((path.name, d["kind"]), []).append(d)
    return docs


def test_statefulset_probes_ports_and_volume_match_brokerd(k8s):
    (sts,) = k8s[("statefulset.yaml", "StatefulSet")]
    spec = sts["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    (c,) = pod["containers"]
    args = brokerd_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"proto": int(args.port), "http": int(args.http_port)}
    assert (ports["proto"], ports["http"]) == (DEFAULTS.port, DEFAULTS.http_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in ROUTES and get["port"] == "http", probe
        assert get["scheme"] == "HTTPS", probe  # with TLS on, the HTTP port speaks only HTTPS
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # TLS from a kubernetes.io/tls Secret and users from another, mounted where the flags point
    secrets = {s["metadata"]["name"]: s for s in k8s[("secrets.example.yaml", "Secret")]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount_of = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    for flag, secret, key in ((args.tls_cert, "brokerd-tls", "tls.crt"), (args.tls_key, "brokerd-tls", "tls.key"),
                              (args.users_file, "brokerd-users", "users.toml")):
        (vol,) = [n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == secret]
        assert flag == f"{mount_of[vol]}/{key}" and key in secrets[secret]["stringData"], flag
    assert secrets["brokerd-tls"]["type"] == "kubernetes.io/tls"
    assert args.tls_required and not args.insecure_no_auth
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 15 * 60  # a long replay
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["periodSeconds"] == 30
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == args.data_dir


def test_services_point_at_the_statefulsets_named_ports(k8s):
    (sts,) = k8s[("statefulset.yaml", "StatefulSet")]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    services = {s["metadata"]["name"]: s for s in k8s[("service.yaml", "Service")]}
    assert set(services) == {"brokerd", sts["spec"]["serviceName"]}
    headless = services[sts["spec"]["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert services["brokerd"]["spec"]["type"] == "ClusterIP"
    for s in services.values():
        assert s["spec"]["selector"].items() <= labels.items()
        for p in s["spec"]["ports"]:
            assert ports[p["targetPort"]] == p["port"]


def test_workers_reach_the_service_and_keda_scales_them_on_the_backlog(k8s):
    (dep,) = k8s[("worker-deployment.yaml", "Deployment")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["brokerd-worker"]
    wargs = worker_args(c["args"])
    assert "-b" not in c["args"] and "--broker" not in c["args"]  # no token in args
    (env,) = [e for e in c["env"] if e["name"] == "BROKERD_URL"]
    ref = env["valueFrom"]["secretKeyRef"]
    (secret,) = [s for s in k8s[("secrets.example.yaml", "Secret")] if s["metadata"]["name"] == ref["name"]]
    url = broker_url(secret["stringData"][ref["key"]])
    assert url.tls and url.host.split(".")[0] == "brokerd" and url.port == DEFAULTS.port
    # the ?ca= file is the Secret's ca.pem, mounted
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (ca_vol,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == ref["name"]]
    (item,) = ca_vol["secret"]["items"]
    assert url.ca == f"{mounts[ca_vol['name']]}/{item['path']}" and item["key"] in secret["stringData"]
    assert pod["terminationGracePeriodSeconds"] > wargs.grace
    (queue,) = wargs.queues

    (so,) = k8s[("keda-scaledobject.yaml", "ScaledObject")]
    (prom_so,) = k8s[("keda-scaledobject-prometheus.yaml", "ScaledObject")]
    assert so["metadata"]["name"] == prom_so["metadata"]["name"]  # one replaces the other
    for obj in (so, prom_so):
        assert obj["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]

    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    url = urlsplit(meta["url"])
    assert url.scheme == "https" and url.hostname.split(".")[0] == "brokerd" and url.port == DEFAULTS.http_port
    assert url.path == "/api/queues"
    # read a real /api/queues document the way KEDA does: ready + in flight
    state = BrokerState()
    state.connect(1)
    for i in range(5):
        state.publish(1, queue, b"x", None, 0, 1.0)
    state.consume(1, [queue], 2, 1.0)
    doc = json.loads(json.dumps(broker_http.queues_json(SimpleNamespace(state=state), 2.0)))
    assert meta["valueLocation"] == f"queues.{queue}.backlog"
    assert value_location(doc, meta["valueLocation"]) == 5  # 3 ready + 2 in flight

    (ptrigger,) = prom_so["spec"]["triggers"]
    assert ptrigger["type"] == "prometheus"
    query = ptrigger["metadata"]["query"]
    assert metric_names_in(query) == {"brokerd_queue_messages"}
    assert f'queue="{queue}"' in query
    states = re.search(r'state=~"([^"]+)"', query).group(1).split("|")
    assert set(states) == {"ready", "inflight"} and set(states) <= set(broker_http.MESSAGE_STATES)


def test_alert_rules_use_only_metrics_brokerd_exports(k8s, exported_metrics, tmp_path):
    (rule,) = k8s[("prometheus-rules.yaml", "PrometheusRule")]
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    names = {a["alert"] for a in alerts}
    assert {"BrokerdDown", "BrokerdLogFailed", "BrokerdDiskNearlyFull", "BrokerdFsyncSlow",
            "BrokerdOldestReadyMessageOld", "BrokerdDeadLettersGrowing"} <= names
    for a in alerts:
        used = metric_names_in(a["expr"])
        assert used and used <= exported_metrics, (a["alert"], used - exported_metrics)
        assert a["labels"]["severity"] in ("critical", "warning", "info")
        assert a["annotations"]["summary"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: PromQL syntax not checked (apt-get install prometheus)")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrape_config_is_valid(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    r = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "docker" / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _brokerd_argvs() -> dict[str, list[str]]:
    """The brokerd command line of each deploy file that runs brokerd in a container."""
    ins = read_dockerfile(DEPLOY / "docker" / "Dockerfile")
    sts = next(d for d in yaml_docs("kubernetes/statefulset.yaml") if d and d.get("kind") == "StatefulSet")
    return {
        "Dockerfile": json.loads([rest for w, rest in ins if w == "CMD"][-1]),
        "compose.yaml": yaml_docs("docker/compose.yaml")[0]["services"]["brokerd"]["command"],
        "statefulset.yaml": sts["spec"]["template"]["spec"]["containers"][0]["args"],
    }


def _start_with_deploy_flags(where, tmp_path, broker_factory_args=None) -> tuple[BrokerProcess, str]:
    """A real brokerd with the deploy file's own flags, its secret paths pointed at test-made
    certificates and a users file (one user, "worker"), on 127.0.0.1 with free ports."""
    argv = _brokerd_argvs()[where]
    args = brokerd_args(argv)
    pki = make_pki(tmp_path / "pki")
    users = tmp_path / "users.toml"
    users.write_text(user_entry("worker", hash_token(TOKEN), {"consume": ["*"], "publish": ["*"]}))
    swap = {args.tls_cert: pki.server_cert, args.tls_key: pki.server_key, args.users_file: str(users)}
    kept, skip = [], False
    for a in argv:  # BrokerProcess sets the address, ports and data dir itself
        if skip:
            skip = False
        elif a in ("--host", "--port", "--http-port", "--data-dir"):
            skip = True
        else:
            kept.append(swap.get(a, a))
    b = BrokerProcess(tmp_path / "data", *kept).start()
    return b, pki.ca


@pytest.mark.parametrize("where", ["Dockerfile", "compose.yaml", "statefulset.yaml"])
def test_deploy_files_bind_all_interfaces_only_with_users_and_tls_never_insecure_no_auth(where):
    argv = _brokerd_argvs()[where]
    args = brokerd_args(argv)
    assert "--insecure-no-auth" not in argv and args.insecure_no_auth is None
    assert args.host == "0.0.0.0" and args.users_file and args.tls_cert and args.tls_key and args.tls_required
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "tls_cert", "tls_key", "tls_required")
                 and v is not None}
    config = load(None, env={}, overrides=overrides)  # (the TLS files exist only in the container)
    assert not config.is_loopback() and config.exposure_refusal() is None and config.security() == "users"
    without = load(None, env={}, overrides={**overrides, "users_file": None})
    assert without.exposure_refusal() is not None  # the users file is what lets it start


@pytest.mark.parametrize("where", ["Dockerfile", "compose.yaml", "statefulset.yaml"])
def test_brokerd_with_the_deploy_flags_serves_a_brokerds_client_with_a_token_and_refuses_others(where, tmp_path):
    b, ca = _start_with_deploy_flags(where, tmp_path)
    try:
        with Client(f"brokerds://worker:{TOKEN}@localhost:{b.port}?ca={ca}", timeout=10) as c:
            c.publish("emails", b"hello")  # a grant the user has, over TLS
        with pytest.raises(AuthFailed):  # TLS but no user
            Client(f"brokerds://localhost:{b.port}?ca={ca}", timeout=10).close()
        with pytest.raises(AuthFailed):  # a wrong token
            Client(f"brokerds://worker:not-{TOKEN}@localhost:{b.port}?ca={ca}", timeout=10).close()
        # plaintext with the right token: refused before any login (--tls-required)
        reply = admin_exchange(b.port, f"AUTH worker {TOKEN}\nQUEUES\n")
        assert "TLS_REQUIRED" in reply and "emails" not in reply, reply
    finally:
        b.terminate()


def test_brokerd_with_the_systemd_config_serves_a_brokerds_client_with_a_token_and_refuses_others(tmp_path):
    path, files = example_config(tmp_path)
    b = BrokerProcess(tmp_path / "data", "--config", str(path)).start()
    try:
        with Client(f"brokerds://worker:{TOKEN}@localhost:{b.port}?ca={files['ca']}", timeout=10) as c:
            c.publish("emails", b"hello")
        with pytest.raises(AuthFailed):
            Client(f"brokerds://localhost:{b.port}?ca={files['ca']}", timeout=10).close()
    finally:
        b.terminate()


def test_init_secrets_script_makes_a_ca_certificate_users_and_env_files_a_brokerd_and_clients_use(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: the compose init step cannot be run here")
    bindir = Path(sys.executable).parent
    if not (bindir / "brokerd-ctl").exists():
        pytest.skip(f"brokerd-ctl is not installed in {bindir} (pip install -e .)")
    d = tmp_path / "secrets"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "BROKERD_ADDRESS": "localhost:7700"}
    r = subprocess.run(["sh", str(DEPLOY / "docker" / "init-secrets.sh"), str(d)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for secret in ("tls/ca.key", "tls/server.key", "users.toml", "worker.env", "webapp.env", "admin.env"):
        assert (d / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    urls = {n: broker_url((d / f"{n}.env").read_text().strip().removeprefix("BROKERD_URL="))
            for n in ("worker", "webapp", "admin")}
    assert all(u.tls and u.ca == str(d / "tls" / "ca.pem") for u in urls.values())
    # a second run keeps everything (the tokens clients hold stay valid)
    before = (d / "users.toml").read_text()
    assert subprocess.run(["sh", str(DEPLOY / "docker" / "init-secrets.sh"), str(d)], env=env,
                          capture_output=True, timeout=60).returncode == 0
    assert (d / "users.toml").read_text() == before
    b = BrokerProcess(tmp_path / "data", "--tls-cert", str(d / "tls/server.pem"), "--tls-key", str(d / "tls/server.key"),
                      "--tls-required", "--users-file", str(d / "users.toml")).start()
    try:
        for name in ("worker", "webapp"):
            u = urls[name]
            with Client(f"brokerds://{u.user}:{u.token}@localhost:{b.port}?ca={u.ca}", timeout=10) as c:
                c.publish("emails", b"x")
        with pytest.raises(AuthFailed):
            Client(f"brokerds://localhost:{b.port}?ca={urls['worker'].ca}", timeout=10).close()
    finally:
        b.terminate()


def test_scrapers_in_compose_and_kubernetes_reach_metrics_by_an_explicit_setting():
    # With users, /metrics and /api/queues need a token unless http_open_metrics says otherwise:
    # the compose Prometheus and the Kubernetes scrape/KEDA jobs send none, so the files say so.
    from broker.config import load

    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    env = compose["services"]["brokerd"]["environment"]
    sts = next(d for d in yaml_docs("kubernetes/statefulset.yaml") if d and d.get("kind") == "StatefulSet")
    k8s_env = {e["name"]: e["value"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    for found in (env, k8s_env):
        assert load(env={"BROKERD_HTTP_OPEN_METRICS": found["BROKERD_HTTP_OPEN_METRICS"]}).http_open_metrics is True
