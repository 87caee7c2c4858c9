"""Signed task envelopes (client/signing.py), tested directly: what a signature covers and what it refuses.

Each refusal case is one an attacker with a publish grant could try: no signature, an altered body, a
signature by a key the worker does not trust, a signature moved to another envelope or another task id,
and the scopes whose leading arguments or ids brokerd fills in (chord bodies, schedules).
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app import App, make_envelope
from client.signing import Signer, SigningError, Verifier, key_id, keygen, main

cryptography = pytest.importorskip("cryptography", reason="signed tasks need the signing extra")
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402


def _pair(kid=None):
    k = Ed25519PrivateKey.generate()
    s = Signer(k, kid)
    return s, Verifier({s.kid: k.public_key()})


def _delivered(env):
    """What the worker decodes: the envelope after a trip through the wire."""
    return cbor2.loads(cbor2.dumps(env))


def _env(tid="t-1", *args, **kw):
    return make_envelope("proj.tasks.add", tid, args or (2, 3), kw)


def test_a_signed_envelope_verifies_after_the_wire_and_carries_kid_alg_scope():
    s, v = _pair("k1")
    env = s.sign(_env())
    assert set(env["sig"]) == {"kid", "alg", "scope", "sig"}
    assert env["sig"]["kid"] == "k1" and env["sig"]["alg"] == "ed25519" and env["sig"]["scope"] == "task"
    assert v.refusal(_delivered(env), "t-1") is None


def test_unsigned_is_refused():
    _, v = _pair()
    assert "not signed" in v.refusal(_delivered(_env()), "t-1")


@pytest.mark.parametrize("change", [
    {"args": [2, 4]}, {"task": "proj.tasks.rm_rf"}, {"kwargs": {"x": 1}}, {"headers": {"h": 1}},
    {"options": {"time_limit": 1}}, {"link": [{"task": "evil"}]}, {"eta": 1.0},
])
def test_an_altered_field_is_refused(change):
    s, v = _pair()
    env = _delivered(s.sign(_env()))
    env.update(change)
    assert "does not match its contents" in v.refusal(env, "t-1")


def test_changing_the_signed_meta_is_refused():
    s, v = _pair()
    env = _delivered(s.sign(_env()))
    env["sig"]["scope"] = "chord-body"  # widen what the signature leaves uncovered
    env["args"] = [["forged"], *env["args"]]
    assert "does not match" in v.refusal(env, "t-1")


def test_an_unknown_key_id_is_refused_naming_it_and_the_trusted_ones():
    s, _ = _pair("old")
    _, v = _pair("new")
    why = v.refusal(_delivered(s.sign(_env())), "t-1")
    assert "'old'" in why and "does not trust" in why and "new" in why


def test_a_trusted_kid_with_another_key_behind_it_is_refused():
    attacker = Signer(Ed25519PrivateKey.generate(), "k1")
    _, v = _pair("k1")
    assert "does not match" in v.refusal(_delivered(attacker.sign(_env())), "t-1")


def test_a_signature_copied_to_another_task_is_refused():
    s, v = _pair()
    a = _delivered(s.sign(_env("t-a", 1, 1)))
    b = _delivered(_env("t-b", 1, 1))
    b["sig"] = a["sig"]
    assert "does not match" in v.refusal(b, "t-b")


def test_a_signed_body_replayed_under_another_message_id_is_refused():
    s, v = _pair()
    env = _delivered(s.sign(_env("t-a")))
    assert "is not its message id" in v.refusal(env, "t-other")


@pytest.mark.parametrize("sig", ["text", {"kid": "k", "alg": "rsa", "scope": "task", "sig": b"x" * 64},
                                 {"kid": 5, "alg": "ed25519"}, {"kid": "k1", "alg": "ed25519", "scope": "task", "sig": b"short"},
                                 {"kid": "k1", "alg": "ed25519", "scope": "all", "sig": b"x" * 64}])
def test_malformed_signature_maps_are_refused_not_raised(sig):
    _, v = _pair("k1")
    env = _delivered(_env())
    env["sig"] = sig
    assert v.refusal(env, "t-1")


def test_a_chord_body_verifies_with_brokerds_prepended_results_and_not_with_changed_args():
    s, v = _pair()
    env = s.sign(_env("body-1", 7), "chord-body")
    delivered = _delivered(env)
    delivered["args"] = [[1, 2, 3], *delivered["args"]]  # what broker/state/schedules.py _finish_chord does
    assert v.refusal(delivered, "body-1") is None
    delivered["args"][1] = 8
    assert "does not match" in v.refusal(delivered, "body-1")
    err = _delivered(s.sign(_env("err-1"), "chord-error"))
    err["args"] = ["member-id", "ValueError", "boom", *err["args"]]
    assert v.refusal(err, "err-1") is None


def test_a_schedule_body_verifies_for_its_ticks_only():
    s, v = _pair()
    env = s.sign(make_envelope("proj.tasks.add", "", (1, 2), {}), "schedule", schedule="nightly")
    run = _delivered(env)
    run["id"] = run["root_id"] = "nightly@1700000000.000"  # what the broker does at each tick
    run["expires"] = 1700000060.0
    assert v.refusal(run, run["id"]) is None
    other = dict(run, id="other@1700000000.000", root_id="other@1700000000.000")
    assert "not a run of the signed schedule entry" in v.refusal(other, other["id"])
    run["args"] = [1, 3]
    assert "does not match" in v.refusal(run, run["id"])


# CBOR values a task's arguments can be: the worker re-encodes what it decoded, so the signed bytes must
# survive the round trip (a value that did not would be refused, never accepted).
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(args=st.lists(_values, max_size=4), kwargs=st.dictionaries(st.text(max_size=5), _values, max_size=3))
def test_any_cbor_arguments_survive_the_wire_and_verify(args, kwargs):
    s, v = _SIGNER
    env = s.sign(make_envelope("proj.tasks.f", "t-h", args, kwargs))
    assert v.refusal(_delivered(env), "t-h") is None


_SIGNER = _pair("h")


def test_the_app_signs_what_it_publishes_only_when_configured(tmp_path):
    kid, kpath, ppath = keygen(str(tmp_path / "tasks"))
    app = App("signing-unit", task_signing_key=kpath)
    assert app.signer.kid == kid == key_id(app.signer.key.public_key())
    assert App("plain").signer is None
    v = Verifier({kid: ppath})
    assert v.refusal(_delivered(app.signer.sign(_env())), "t-1") is None


def test_keygen_writes_a_private_key_only_the_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k")]) == 0
    kid = capsys.readouterr().out.strip()
    assert len(kid) == 16
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert main(["keygen", str(tmp_path / "k")]) == 2
    assert "not overwriting" in capsys.readouterr().err


def test_bad_key_settings_say_what_to_fix(tmp_path):
    with pytest.raises(SigningError, match="cannot read the key file"):
        Signer(str(tmp_path / "missing.key"))
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        Signer(str(tmp_path / "junk.pem"))
    with pytest.raises(SigningError, match="non-empty map"):
        Verifier({})
