"""The docs name only what exists (issue 17, "Docs true").

README.md and every file under deploy/ name repository files, environment
variables and container paths; a rename in the code must not leave them
pointing at nothing (as a cited RELIABILITY.md once did).  These tests read the
real files.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from broker.config import Config
from tests.support.broker import ROOT

DOCS = [ROOT / "README.md"] + sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
# A path-looking token: words joined by "/" (a leading ./ or ../ allowed).
PATH = re.compile(r"(?<![\w/.~$@:-])((?:\.{1,2}/)*[A-Za-z_][\w.@-]*(?:/[\w.@-]+)*/?)")
ENV = re.compile(r"\bBROKERD_[A-Z0-9_]+\b")
CODE_DIRS = ("broker", "client", "examples")


def repo_paths(text: str) -> set[str]:
    """Repository paths a doc names: "dir/..." under a top-level entry, and bare NAME.md files."""
    out = set()
    for tok in PATH.findall(text):
        tok = tok.rstrip(".")
        if ("/" in tok and tok.split("/")[0] in TOP) or re.fullmatch(r"[A-Z][A-Z_]+\.md", tok):
            out.add(tok)
    return out


def test_every_repository_path_named_in_readme_and_deploy_exists():
    missing = [f"{doc.relative_to(ROOT)}: {p}" for doc in DOCS for p in sorted(repo_paths(doc.read_text()))
               if not (ROOT / p).exists() and not (doc.parent / p).exists()]
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


def test_the_path_check_catches_a_missing_file():
    """The check above is not vacuous: it sees the paths, and a made-up one is missing."""
    found = repo_paths("see RELIABILITY.md and deploy/docker/compose.yaml, or deploy/systemd/brokerd-worker@.service")
    assert found == {"RELIABILITY.md", "deploy/docker/compose.yaml", "deploy/systemd/brokerd-worker@.service"}
    assert not (ROOT / "RELIABILITY.md").exists()


def known_env() -> set[str]:
    """BROKERD_* names something reads: a setting (BROKERD_<SETTING>), or a name the code or a
    deploy script reads (os.environ / ${NAME...} in a shell script)."""
    names = {"BROKERD_" + name.upper() for name in Config.field_types()}
    for d in CODE_DIRS:
        for py in (ROOT / d).rglob("*.py"):
            names |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](BROKERD_[A-Z0-9_]+)", py.read_text()))
    for sh in (ROOT / "deploy").rglob("*.sh"):
        names |= set(re.findall(r"\$\{(BROKERD_[A-Z0-9_]+)", sh.read_text()))
    return names


def test_every_brokerd_env_var_named_in_readme_and_deploy_is_read_by_something():
    known = known_env()
    unknown = [f"{doc.relative_to(ROOT)}: {name}" for doc in DOCS for name in sorted(set(ENV.findall(doc.read_text())))
               if name not in known]
    assert not unknown, "documented but read by nothing:\n" + "\n".join(unknown)
    assert "BROKERD_PORT" in known and "BROKERD_URL" in known and "BROKERD_NO_SUCH" not in known


def test_compose_mounts_and_dockerfile_copies_exist():
    compose_dir = ROOT / "deploy" / "docker"
    compose = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (compose_dir / src).exists(), f"compose service {name} mounts {src}, which does not exist"
        build = svc.get("build")
        if build:
            assert (compose_dir / build["context"] / build["dockerfile"]).exists(), build
    dockerfile = (compose_dir / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        *sources, _dest = line.split()
        for src in sources:
            if not src.startswith("--"):
                assert list(ROOT.glob(src.lstrip("./") or ".")), f"Dockerfile copies {src}, which is not in the repository"


def test_compose_example_tasks_write_where_the_non_root_worker_may():
    """The example's tasks write files under EXAMPLE_OUTBOX (default ./outbox, i.e. under the
    root-owned /app); in the compose demo the workers run as the image's non-root user, so the
    compose file must point EXAMPLE_OUTBOX at a directory that user may write."""
    tasks_src = (ROOT / "examples" / "tasks.py").read_text()
    assert 'os.environ.get("EXAMPLE_OUTBOX"' in tasks_src  # the variable the compose file sets
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)", dockerfile, re.M).group(1)
    assert not user.startswith("0") and user != "root", user
    owned = set()
    for m in re.finditer(r"chown (\S+) ([^\\\n&]+)", dockerfile):
        if m.group(1) == user:
            owned |= set(m.group(2).split())
    writable = owned | {"/tmp"}  # /tmp: world-writable (sticky) in every base image
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.M)[-1]
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    runners = {n: s for n, s in compose["services"].items() if "examples.tasks:app" in " ".join(s.get("command") or [])}
    assert runners, "no compose service runs the example tasks"
    for name, svc in runners.items():
        outbox = (svc.get("environment") or {}).get("EXAMPLE_OUTBOX", "./outbox")
        path = outbox if outbox.startswith("/") else f"{workdir}/{outbox}"
        assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in writable), (
            f"{name}: the example tasks would write {path}, which uid {user} cannot (writable: {sorted(writable)})")
