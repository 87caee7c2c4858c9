"""Signed tasks end to end: a real brokerd, a real ``brokerd-worker`` that trusts one Ed25519 key.

A signed task runs; an unsigned one, one whose body was altered, one signed by a key the worker does
not trust, and one carrying a signature copied from another task are each dead-lettered with a FAILURE
``SecurityError`` saying why, and never run (each would have written a file).  The worker keeps serving,
and the envelopes brokerd completes itself (chord bodies, scheduled runs) verify.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import cbor2
import pytest

from client.app import App, RemoteError, make_envelope
from client.beat import push
from client.canvas import Signature, chain, chord
from tests.support.broker import ROOT, BrokerProcess

pytest.importorskip("cryptography", reason="signed tasks need the signing extra (pip install 'brokerd[signing]')")
from client.signing import Signer, keygen  # noqa: E402

MOD = "tests.worker.signed_app"
WAIT = 20.0  # seconds any single result may take on a loaded CI box


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    kid, kpath, ppath = keygen(str(d / "tasks"))
    return kid, kpath, ppath


@pytest.fixture(scope="module")
def setup(tmp_path_factory, keys):
    """brokerd, a producer app that signs, and one worker trusting its key (which also signs its chain steps)."""
    kid, kpath, ppath = keys
    d = tmp_path_factory.mktemp("signed")
    b = BrokerProcess(d / "broker")
    b.start()
    app = App("signed-producer", broker=b.address, task_signing_key=kpath)
    q = f"s.{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = q
    log = open(d / "worker.log", "w")
    env = dict(os.environ, PYTHONPATH=str(ROOT), BROKERD_URL=b.address, SIGNED_APP_KEY=kpath, PYTHONUNBUFFERED="1")
    w = subprocess.Popen([sys.executable, "-m", "client.worker_cli", MOD, "-b", b.address, "-Q", q, "-P", "threads",
                          "-c", "4", "-n", "signed@test", "--signing-public-key", f"{kid}={ppath}"],
                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield app, q, w, d
    finally:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(5)
        log.close()
        app.close()
        b.terminate()


def _name(task):
    return f"{MOD}.{task}"


def _publish_raw(app, q, env, msg_id=None):
    app.client.publish(q, cbor2.dumps(env), id=msg_id or env["id"])
    return msg_id or env["id"]


def _refused(app, tid) -> str:
    with pytest.raises(RemoteError) as info:
        app.AsyncResult(tid).get(timeout=WAIT)
    assert info.value.exc_type == "SecurityError", info.value
    assert "It was not run" in info.value.exc_message
    return info.value.exc_message


def test_signed_tasks_run_and_forged_ones_are_dead_lettered_unrun(setup):
    app, q, w, d = setup
    ok = d / "ok"
    assert app.send_task(_name("record"), (str(ok), "signed")).get(timeout=WAIT) == "signed"
    assert ok.read_text() == "signed"
    signer = app.signer
    files = {k: d / f"{k}-{uuid.uuid4().hex[:6]}" for k in ("unsigned", "altered", "unknown", "copied")}

    def env_for(path, tid=None):
        return make_envelope(_name("record"), tid or str(uuid.uuid4()), [str(path)], {})

    unsigned = _publish_raw(app, q, env_for(files["unsigned"]))
    altered_env = signer.sign(env_for(d / "harmless"))
    altered_env["args"] = [str(files["altered"])]  # the attacker points the signed call elsewhere
    altered = _publish_raw(app, q, altered_env)
    stranger = Signer(__import__("cryptography.hazmat.primitives.asymmetric.ed25519",
                                 fromlist=["x"]).Ed25519PrivateKey.generate(), "attacker")
    unknown = _publish_raw(app, q, stranger.sign(env_for(files["unknown"])))
    good = signer.sign(env_for(d / "harmless2"))
    copied_env = env_for(files["copied"])
    copied_env["sig"] = good["sig"]  # a signature lifted from another task
    copied = _publish_raw(app, q, copied_env)
    replayed = _publish_raw(app, q, signer.sign(env_for(d / "harmless3")), msg_id=str(uuid.uuid4()))

    assert "not signed" in _refused(app, unsigned)
    assert "does not match its contents" in _refused(app, altered)
    assert "'attacker', which this worker does not trust" in _refused(app, unknown)
    assert "does not match its contents" in _refused(app, copied)
    assert "is not its message id" in _refused(app, replayed)
    for path in [*files.values(), d / "harmless", d / "harmless3"]:
        assert not path.exists(), f"{path.name}: a refused task ran"
    assert app.client.stats(f"{q}.dlq")["ready"] == 5
    # the worker lives on and still runs signed work
    assert app.send_task(_name("add"), (20, 22)).get(timeout=WAIT) == 42
    assert w.poll() is None


def test_chords_and_chains_are_signed_and_run(setup):
    app, q, w, _ = setup
    members = [Signature(_name("add"), (i, i), {}, app=app) for i in range(5)]
    r = chord(members, Signature(_name("tsum"), (), {}, app=app)).apply_async()
    assert r.get(timeout=WAIT) == 20  # brokerd prepended the results: the body's signature still verifies
    # a chain's next step is sent by the worker, signed with its own task_signing_key
    c = chain(Signature(_name("add"), (1, 2), {}, app=app).set(queue=q),
              Signature(_name("add"), (10,), {}, app=app).set(queue=q)).apply_async()
    assert c.get(timeout=WAIT) == 13


def test_a_scheduled_run_made_by_brokerd_verifies(setup):
    app, q, w, _ = setup
    marker = f"beat-{uuid.uuid4().hex[:8]}"
    app.conf.beat_schedule = {f"sig-{marker}": {"task": _name("mark"), "schedule": 1.0, "args": (marker,),
                                                "options": {"queue": q}}}
    try:
        push(app)
        assert app.AsyncResult(marker).get(timeout=WAIT) == w.pid
    finally:
        app.conf.beat_schedule = {}
        push(app)


def test_a_bad_public_key_flag_is_a_usage_error_naming_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "client.worker_cli", MOD, "--signing-public-key",
                        f"k1={tmp_path / 'missing.pub'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "cannot read the key file" in p.stderr and "missing.pub" in p.stderr
    p = subprocess.run([sys.executable, "-m", "client.worker_cli", MOD, "--signing-public-key", "nokid"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "KID=PATH" in p.stderr
