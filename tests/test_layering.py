"""The layering of DESIGN.md, checked: each module imports only what its layer allows.

Reads the source with ``ast`` (no imports run), so a forbidden import is caught
even on a code path the other tests never execute.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TASK_LAYER_ABOVE_ENVELOPE = {"client.app", "client.canvas", "client.beat", "client.result", "client._current",
                             "client.worker"}

IO = {"trio", "socket", "asyncio", "selectors", "ssl", "subprocess", "threading"}
CLOCK = {"time", "datetime", "random"}

# module (path relative to ROOT) -> top-level names / module prefixes it may not import
FORBIDDEN = {
    "client/wire.py": IO | CLOCK | {"os", "broker", "client"},
    "broker/state/": IO | CLOCK | {"os", "broker.wal", "broker.runtime", "broker.handlers", "broker.cli", "broker.boot",
                                   "hypercorn"},
    "broker/wal/format.py": IO | CLOCK | {"os", "broker.state", "broker.runtime", "client"},
    "broker/wal/recovery.py": IO | CLOCK | {"broker.state", "broker.runtime", "client"},
    "broker/wal/repair.py": IO | CLOCK | {"broker.state", "broker.runtime", "client"},
    "broker/wal/files.py": IO | CLOCK | {"broker.state", "broker.runtime", "client"},
    "broker/wal/faults.py": IO | CLOCK | {"broker.state", "broker.runtime", "client"},
    "broker/wal/errors.py": IO | CLOCK | {"broker.state", "broker.runtime", "client"},
    # the log never imports trio, the broker state or the runtime above it
    "broker/wal/": {"trio", "hypercorn", "broker.state", "broker.runtime", "broker.handlers", "client"},
    # the log runs write_batch in a worker thread, so a threading.Lock is fair
    "broker/wal/log.py": (IO - {"threading"}) | {"broker.state", "broker.runtime", "client"},
    # handlers are pure: decode, call the state, build the reply; the runtime does the I/O
    "broker/handlers/": IO | CLOCK | {"os", "hypercorn", "broker.runtime", "broker.wal", "broker.cli", "broker.boot"},
    "broker/config.py": {"broker", "client", "trio"},
    # who may do what, decided without I/O or a clock (the handshake and handlers ask it)
    "broker/auth.py": IO | CLOCK | {"broker.runtime", "broker.state", "broker.wal", "broker.handlers", "hypercorn"},
    "broker/errors.py": IO | {"broker.state", "broker.runtime", "broker.handlers"},
    "client/session.py": IO | CLOCK,
    # argument shaping shared by the shells, the verb table and the CLIs: below all of them
    "client/options.py": IO | CLOCK | {"broker", "client.session", "client.producer", "client.async_client",
                                       "client.verbs"},
    "client/errors.py": IO | {"broker"},
    "client/producer.py": {"trio", "asyncio", "broker"},
    # the blocking shell's engine (socket, reader and flusher threads) sits below the shell's verbs
    "client/blocking.py": {"trio", "asyncio", "broker", "client.producer", "client.async_client"},
    "client/async_client.py": {"broker", "client.producer"},
    # one description of every verb, shared by both shells: no I/O, no event loop
    "client/verbs.py": IO | {"broker", "client.producer", "client.async_client"},
    # the async shell's adapters are the only client module besides it that names an event loop
    "client/loops.py": {"broker", "client.producer"},
    # the HTTP side reads the live state through the server it is given;
    # it never touches the log's files, and its trio is hypercorn's
    "broker/runtime/http.py": {"trio", "broker.wal", "broker.state", "broker.cli"},
    "broker/web/": IO | {"os", "hypercorn", "broker.wal", "broker.state", "broker.runtime", "broker.cli"},
    "broker/runtime/notify.py": {"trio", "broker.state", "broker.wal"},
    # boot opens the data dir and replays the log; the trio runtime starts the server it builds
    "broker/boot.py": {"trio", "hypercorn"},
    "client/ctl.py": {"broker", "trio", "asyncio"},
    # shared with brokerd: hashing and the file writer, nothing of the client above it
    "client/userfile.py": IO | {"broker", "client.producer", "client.session", "client.wire"},
    # The task layer, bottom up: exceptions and the current context import nothing
    # of it; the envelope only the exceptions; results not the app; canvas not the
    # app (the app imports canvas for task.s(), so the dependency runs one way).
    "client/exceptions.py": IO | CLOCK | {"os", "broker", "client"},
    "client/_current.py": IO | CLOCK | {"os", "broker", "client"},
    # the argument tags for naive datetimes and times (below the envelope): calendar only, no clock
    "client/cbortags.py": IO | CLOCK | {"os", "broker", "client"},
    # signals: a receiver registry (a lock guards it), below everything that sends them
    "client/signals.py": (IO - {"threading"}) | CLOCK | {"os", "broker", "client"},
    "client/envelope.py": IO | CLOCK | TASK_LAYER_ABOVE_ENVELOPE | {"os", "broker", "client.producer"},
    "client/result.py": {"trio", "asyncio", "broker", "client.app", "client.canvas", "client.beat", "client.worker"},
    "client/canvas.py": {"trio", "asyncio", "broker", "client.app", "client.beat", "client.worker"},
    "client/app.py": {"trio", "asyncio", "broker", "client.beat", "client.worker"},
    "client/beat.py": {"trio", "asyncio", "broker", "client.app", "client.canvas", "client.worker"},
    # the worker package: pools and the runner are driven by the runtime, never the other way round
    "client/worker/pools/": {"broker", "client.worker.runtime", "client.worker.intake", "client.worker.control"},
    "client/worker/runner.py": {"broker", "client.worker.runtime", "client.worker.pools", "client.worker.intake",
                                "client.worker.channel", "client.worker.control", "client.worker.events"},
    # the main loops drive the runtime through the Worker they are given; they never import it
    # (the runtime imports them), and only the trio pool's loop imports trio
    "client/worker/mainloop.py": {"broker", "trio", "asyncio", "client.worker.runtime", "client.worker.trio_loop"},
    "client/worker/trio_loop.py": {"broker", "asyncio", "client.worker.runtime", "client.worker.mainloop"},
    "client/worker/": {"broker"},
}

# broker/ may use client.wire (the shared codec) and nothing else from client/.
# client.userfile: token hashing and the users-file entry writer, shared by brokerd (checking a
# login) and brokerd-ctl user add (which may not import broker/)
# client.envelope: the task envelope's one writer (protocol.md §8), pure (its own rule above: no I/O,
# no clock, nothing of the task layer), for the page's retry button (broker/web/actions.py)
BROKER_MAY_IMPORT_FROM_CLIENT = {"client.wire", "client.userfile", "client.envelope"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if (ROOT / node.module.replace(".", "/")).is_dir():
                # `from client import canvas` imports the module client.canvas
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def hits(name: str, banned: set[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def files_for(key: str) -> list[Path]:
    p = ROOT / key
    if key.endswith("/"):
        return sorted(p.rglob("*.py"))
    return [p] if p.exists() else []


# Calendar arithmetic needs datetime; this file may import it but never read the clock.
CALENDAR_ONLY = {"broker/state/cron.py": {"datetime"}, "broker/handlers/admin.py": {"datetime"},
                 "client/envelope.py": {"datetime"}, "client/cbortags.py": {"datetime"}}
CLOCK_CALLS = {"now", "today", "utcnow", "time", "monotonic", "perf_counter"}


@pytest.mark.parametrize("key", sorted(FORBIDDEN))
def test_module_keeps_to_its_layer(key):
    for path in files_for(key):
        allowed = CALENDAR_ONLY.get(path.relative_to(ROOT).as_posix(), set())
        bad = sorted(n for n in imports_of(path) if hits(n, FORBIDDEN[key]) and n not in allowed)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}, which its layer forbids (DESIGN.md)"


TRIO = {"trio", "hypercorn"}  # hypercorn serves HTTP on trio: it counts as trio


def test_only_the_runtime_and_cli_import_trio_in_the_broker():
    for path in sorted((ROOT / "broker").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("broker/runtime/") or rel == "broker/cli.py":
            continue
        assert not hits_any(imports_of(path), TRIO), f"{rel} imports trio; only broker/runtime/ and cli.py may"


def test_the_broker_runtime_is_where_its_trio_is():
    # The rule above checks nothing if the trio code moved away from broker/runtime/.
    users = {p.name for p in (ROOT / "broker" / "runtime").glob("*.py") if hits_any(imports_of(p), TRIO)}
    assert {"server.py", "connection.py", "admin_conn.py", "durability.py", "http.py"} <= users


def hits_any(names, banned):
    return any(hits(n, banned) for n in names)


def test_broker_uses_only_the_shared_codec_from_client():
    for path in sorted((ROOT / "broker").rglob("*.py")):
        for name in imports_of(path):
            if name == "client" or name.startswith("client."):
                assert name in BROKER_MAY_IMPORT_FROM_CLIENT, (
                    f"{path.relative_to(ROOT)} imports {name}; the daemon may use only client.wire"
                )


def test_the_layering_rules_cover_files_that_exist():
    # A rule for a file that was renamed away would silently check nothing.
    for key in ("client/wire.py", "broker/state/", "broker/handlers/", "broker/config.py", "broker/boot.py",
                "broker/runtime/http.py", "broker/web/", "broker/runtime/notify.py", "client/ctl.py", "client/worker/pools/",
                "client/worker/runner.py", "client/worker/channel.py", "broker/wal/format.py", "broker/wal/recovery.py",
                "broker/wal/repair.py", "broker/wal/files.py", "broker/wal/faults.py", "broker/wal/errors.py"):
        assert files_for(key), key


def test_calendar_modules_never_read_the_clock():
    for rel in CALENDAR_ONLY:
        tree = ast.parse((ROOT / rel).read_text())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & CLOCK_CALLS, f"{rel} calls {sorted(calls & CLOCK_CALLS)}: pass the time in"


# -- the task layer ----------------------------------------------------------------------------
TASK_LAYER = ["client/exceptions.py", "client/_current.py", "client/envelope.py", "client/result.py",
              "client/canvas.py", "client/app.py", "client/beat.py"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def module_level_imports(path: Path) -> set[str]:
    """What a module imports when it is imported: everything but imports inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(imports_of_node(child))
            visit(child)

    visit(tree)
    return found


def imports_of_node(node) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if node.level or not node.module:
        return set()
    names = {node.module}
    if (ROOT / node.module.replace(".", "/")).is_dir():
        names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_client_package_has_no_import_cycle():
    # Module-level imports only: a cycle held together by an import inside a
    # function is still a cycle, and the next test forbids that dodge.
    paths = {module_name(p): p for p in sorted((ROOT / "client").rglob("*.py"))}
    graph = {m: sorted(n for n in module_level_imports(p) if n in paths and n != m) for m, p in paths.items()}
    done: set[str] = set()

    def walk(m, stack):
        if m in stack:
            cycle = stack[stack.index(m):] + [m]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if m in done:
            return
        for n in graph[m]:
            walk(n, stack + [m])
        done.add(m)

    for m in graph:
        walk(m, [])


LAZY_IMPORT_MARK = "lazy import"  # the comment that says why an import waits until it is needed


@pytest.mark.parametrize("rel", TASK_LAYER)
def test_task_layer_imports_at_the_top_unless_a_comment_says_why(rel):
    path = ROOT / rel
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text(), filename=rel)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                above = " ".join(lines[max(0, node.lineno - 5):node.lineno]).lower()
                assert LAZY_IMPORT_MARK in above, (
                    f"{rel}:{node.lineno} imports inside {fn.name}(); import at the top, or say in a "
                    f"'{LAZY_IMPORT_MARK}' comment why it must wait"
                )


def own_private_names(tree) -> set[str]:
    """The _names a module defines: functions, classes, globals, and attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


@pytest.mark.parametrize("rel", TASK_LAYER)
def test_task_layer_touches_no_other_modules_private_names(rel):
    tree = ast.parse((ROOT / rel).read_text(), filename=rel)
    own = own_private_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            bad = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            assert not bad, f"{rel}:{node.lineno} imports {bad} from {node.module}, private to it"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            assert node.attr in own, (
                f"{rel}:{node.lineno} uses .{node.attr}, a private name of another module; "
                "ask that module for a public one"
            )


def test_the_task_layer_rules_cover_files_that_exist():
    for rel in TASK_LAYER:
        assert (ROOT / rel).exists(), rel


# The worker drives the blocking client through its public pipelined calls (Client.submit,
# flush, wait_closed, fileno, Consumer.on_wake/buffer); os._exit is public despite its name.
WORKER = ROOT / "client" / "worker"
MAY_TOUCH_PRIVATE: set[str] = set()
PUBLIC_DESPITE_UNDERSCORE = {("os", "_exit")}


def test_worker_modules_touch_no_other_modules_private_names():
    bad = []
    for path in sorted(WORKER.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("client.worker"):
                bad += [f"{rel}:{node.lineno} imports {a.name} from {node.module}"
                        for a in node.names if a.name.startswith("_")]
            if rel in MAY_TOUCH_PRIVATE or not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in ("self", "cls") or (owner, name) in PUBLIC_DESPITE_UNDERSCORE:
                continue
            bad.append(f"{rel}:{node.lineno} touches {ast.unparse(node)}")
    assert not bad, "private names used across modules (add a public method):\n" + "\n".join(bad)


def test_the_worker_never_reaches_into_the_client():
    # A private access would break silently when the client changes; the public calls are tested there.
    for path in sorted(WORKER.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in MAY_TOUCH_PRIVATE:
            continue
        text = path.read_text()
        for private in ("._session", "._lock", "._flush", "._reader", "._state", "._sock", "._client"):
            assert private not in text.replace("self." + private[1:], ""), f"{rel} uses {private}; use the client's public calls"


def test_the_client_split_rules_cover_files_that_exist():
    # The modules split out of the shells, the session and the worker's runtime: a rule for one
    # renamed away would silently check nothing.
    for key in ("client/options.py", "client/blocking.py", "client/worker/mainloop.py", "client/worker/trio_loop.py"):
        assert files_for(key), key


# -- frames through the codec's constructors ----------------------------------------------------
# A server frame has one definition, in client/wire.py (ok_frame, error_frame, deliver_frame,
# closing_frame, control_frame, event_frame); a list built by hand elsewhere could drift from it.
SERVER_FRAME_OPS = {"OP_OK", "OP_ERROR", "OP_DELIVER", "OP_CLOSING", "OP_CONTROL", "OP_EVENT", "OP_HEARTBEAT"}
# (file, function) pairs allowed to build one inline; each names its reason and figure in a comment.
INLINE_SERVER_FRAMES: set[tuple[str, str]] = set()


def hand_built_server_frames(source: str, rel: str) -> list[str]:
    tree = ast.parse(source, filename=rel)
    found = []

    def visit(node, fn):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if (isinstance(child, (ast.List, ast.Tuple)) and child.elts and isinstance(child.elts[0], ast.Name)
                    and child.elts[0].id in SERVER_FRAME_OPS and (rel, fn) not in INLINE_SERVER_FRAMES):
                found.append(f"{rel}:{child.lineno} in {fn}(): {ast.unparse(child)[:60]}")
            visit(child, inner)

    visit(tree, "<module>")
    return found


def frame_building_modules() -> list[Path]:
    paths = sorted((ROOT / "broker").rglob("*.py")) + sorted((ROOT / "client").rglob("*.py"))
    return [p for p in paths if p != ROOT / "client" / "wire.py"]


def test_server_frames_are_built_by_the_codecs_constructors():
    bad = [hit for p in frame_building_modules()
           for hit in hand_built_server_frames(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not bad, "server frames built by hand; use client.wire's ok_frame, error_frame, ...:\n" + "\n".join(bad)


def test_the_frame_rule_sees_a_hand_built_frame():
    # The rule above passes vacuously if the scan cannot see a frame: show it one, split over lines.
    source = "def h(rid):\n    return [\n        OP_OK,\n        rid,\n        None,\n    ]\n"
    assert hand_built_server_frames(source, "x.py") == ["x.py:2 in h(): [OP_OK, rid, None]"]


# -- HTTP and the page read frozen views -----------------------------------------------------------
# broker/runtime/http.py and broker/web/ read the state through broker.handlers.views (frozen
# copies built on request), never through its live structures: a renderer can then neither change
# the state nor see it half-way through a change.
LIVE_STATE_ATTRS = {"queues", "conns", "inflight", "results", "task_history", "outbox", "records", "consumers",
                    "schedules", "subscribers", "workers", "chords"}
VIEW_READERS = ["broker/runtime/http.py", "broker/web/"]


def live_state_reads(source: str, rel: str) -> list[str]:
    """``state.X`` or ``<anything>.state.X`` with X a live structure of the state."""
    found = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        if not isinstance(node, ast.Attribute) or node.attr not in LIVE_STATE_ATTRS:
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id == "state") or (
                isinstance(owner, ast.Attribute) and owner.attr == "state"):
            found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_http_and_the_page_read_the_state_only_through_views():
    bad = [hit for key in VIEW_READERS for p in files_for(key)
           for hit in live_state_reads(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not bad, "live state read by the HTTP side; add a view to broker/handlers/views.py:\n" + "\n".join(bad)


def test_the_view_rule_sees_a_live_read():
    source = "def f(server, state):\n    return len(server.state.queues) + len(state.inflight) + len(state.statistics().queues)\n"
    assert live_state_reads(source, "x.py") == ["x.py:2: server.state.queues", "x.py:2: state.inflight"]
    assert all(files_for(key) for key in VIEW_READERS)
