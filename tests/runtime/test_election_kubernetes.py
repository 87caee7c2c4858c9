"""--election kubernetes against a small fake Lease API written here (trio HTTP on loopback).

The fake keeps one coordination.k8s.io/v1 Lease the way the API server does for these calls:
GET, POST (create; 409 when it exists), PUT (409 unless metadata.resourceVersion is the current
one), a new resourceVersion on every write, 401 without the bearer token.  It is not a real
API server (no watch, no field validation); what it checks is the optimistic concurrency and
the fencing rule brokerd relies on.
"""

from __future__ import annotations

import functools
import json

import pytest
import trio

from broker.runtime.election import ANNOTATION_CONFIRMED, Elector, EngineError, KubernetesEngine, fence_margin
from tests.runtime.test_election import POLL, FakeRoles

TTL = 2  # seconds (leaseDurationSeconds)
NS, NAME = "brokers", "brokerd-leader"
PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{NAME}"
TOKEN = "sa-token-1"


class FakeLeaseAPI:
    def __init__(self):
        self.lease: dict | None = None
        self.version = 0
        self.stalled = False  # True: requests are read and never answered (a partition)
        self.requests: list[tuple[str, str]] = []
        self.port = 0

    async def serve(self, nursery) -> None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    async def handle(self, stream) -> None:
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            while len(body) < int(headers.get("content-length", 0)):
                body += await stream.receive_some(65536)
            self.requests.append((method, path))
            if self.stalled:
                await trio.sleep_forever()
            status, doc = self.answer(method, path, headers, json.loads(body) if body else None)
            out = json.dumps(doc).encode()
            await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: "
                                  f"{len(out)}\r\nConnection: close\r\n\r\n".encode() + out)

    def answer(self, method, path, headers, doc):
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, {"kind": "Status", "code": 401, "message": "Unauthorized"}
        if method == "GET" and path == PATH:
            return (200, self.lease) if self.lease else (404, {"kind": "Status", "code": 404, "message": "not found"})
        if method == "POST" and path == PATH.rsplit("/", 1)[0]:
            if self.lease is not None:
                return 409, {"kind": "Status", "code": 409, "message": "already exists"}
            return 201, self._store(doc)
        if method == "PUT" and path == PATH:
            if self.lease is None:
                return 404, {"kind": "Status", "code": 404, "message": "not found"}
            if doc["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
                return 409, {"kind": "Status", "code": 409, "message": "the object has been modified"}
            return 200, self._store(doc)
        return 404, {"kind": "Status", "code": 404, "message": f"no route {method} {path}"}

    def _store(self, doc):
        self.version += 1
        doc["metadata"]["resourceVersion"] = str(self.version)
        self.lease = doc
        return doc


class NoRelease(KubernetesEngine):
    async def release(self) -> None:
        self.mine = None


@pytest.fixture
async def api(nursery):
    fake = FakeLeaseAPI()
    await fake.serve(nursery)
    return fake


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def engine(api, identity, token_file, cls=KubernetesEngine):
    return cls("127.0.0.1", api.port, NS, NAME, identity, TTL, token_file=token_file)


async def test_one_candidate_acquires_the_lease_and_the_other_follows_it(api, token_file, nursery):
    a, b = FakeRoles(), FakeRoles()
    nursery.start_soon(Elector(engine(api, "b-0.h:7700", token_file), a, "b-0.h:7700", poll=POLL).run)
    nursery.start_soon(Elector(engine(api, "b-1.h:7700", token_file), b, "b-1.h:7700", poll=POLL).run)
    with trio.fail_after(15):
        while not (a.times("promote") or b.times("promote")):
            await trio.sleep(POLL)
        winner, loser, address = (a, b, "b-0.h:7700") if a.times("promote") else (b, a, "b-1.h:7700")
        await loser.wait_for("follow", address)
        while api.lease["metadata"].get("annotations", {}).get("brokerd.io/epoch") != "1":
            await trio.sleep(POLL)
    assert not loser.times("promote")
    spec = api.lease["spec"]
    assert spec["holderIdentity"] == address and spec["leaseDurationSeconds"] == TTL
    assert spec["renewTime"].endswith("Z") and "T" in spec["acquireTime"]
    # the loser's PUT or POST met the winner's write and was refused (optimistic concurrency), or it
    # read the Lease first and never tried: either way one holder
    assert winner.role == "leader"


async def test_a_leader_whose_renewals_stop_is_fenced_before_the_other_takes_the_lease(api, token_file, nursery):
    a, b = FakeRoles(), FakeRoles()
    ea = Elector(engine(api, "b-0.h:7700", token_file, NoRelease), a, "b-0.h:7700", poll=POLL)
    nursery.start_soon(ea.run)
    with trio.fail_after(20):
        await a.wait_for("promote")
        nursery.start_soon(Elector(engine(api, "b-1.h:7700", token_file), b, "b-1.h:7700", poll=POLL).run)
        await b.wait_for("follow", "b-0.h:7700")
        while ea.renew_scope is None:
            await trio.sleep(POLL)
        last_renewal = ea.renewed_at
        ea.renew_scope.cancel()
        promoted = await b.wait_for("promote")
    fenced = a.first_after("fence", a.times("promote")[0])
    assert fenced is not None and fenced < promoted
    assert fenced <= last_renewal + TTL - fence_margin(TTL) + 0.5
    # b waited a whole leaseDurationSeconds from when it last saw the Lease change
    assert promoted >= last_renewal + TTL
    assert api.lease["spec"]["holderIdentity"] == "b-1.h:7700"
    assert api.lease["spec"]["leaseTransitions"] == 1


async def test_a_leader_cut_off_from_the_api_server_fences_within_the_lease(api, token_file, nursery):
    a = FakeRoles()
    ea = Elector(engine(api, "b-0.h:7700", token_file), a, "b-0.h:7700", poll=POLL)
    nursery.start_soon(ea.run)
    with trio.fail_after(20):
        await a.wait_for("promote")
        seen = ea.renewed_at
        while ea.renewed_at == seen:
            await trio.sleep(POLL)
        last_renewal = ea.renewed_at
        api.stalled = True
        fenced = await a.wait_for("fence", count=2)  # the first is the one every elector starts with
    assert TTL - fence_margin(TTL) - 0.01 <= fenced - last_renewal < TTL


async def test_a_candidate_behind_the_confirmed_lsn_in_the_lease_does_not_campaign(api, token_file, nursery):
    api._store({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": NAME, "namespace": NS, "annotations": {ANNOTATION_CONFIRMED: "70"}},
                "spec": {"holderIdentity": "", "leaseDurationSeconds": TTL}})
    behind = FakeRoles(lsn=69)
    eb = Elector(engine(api, "b-1.h:7700", token_file), behind, "b-1.h:7700", poll=POLL)
    nursery.start_soon(eb.run)
    with trio.fail_after(10):
        while "not campaigning" not in eb._said:
            await trio.sleep(POLL)
        writes = [r for r in api.requests if r[0] != "GET"]
        assert not writes and not behind.times("promote")
        behind.lsn = 70
        await behind.wait_for("promote")
        assert api.lease["metadata"]["annotations"][ANNOTATION_CONFIRMED] == "70"


async def test_without_the_token_the_error_names_the_rbac_the_pod_needs(api, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    e = KubernetesEngine("127.0.0.1", api.port, NS, NAME, "b-0.h:7700", TTL, token_file=str(wrong))
    with pytest.raises(EngineError, match="needs get/create/update on leases.coordination.k8s.io"):
        await e.observe()
    missing = KubernetesEngine("127.0.0.1", api.port, NS, NAME, "b-0.h:7700", TTL, token_file=str(tmp_path / "no"))
    with pytest.raises(EngineError, match="cannot read the service-account token"):
        await missing.observe()


def test_outside_a_pod_kubernetes_election_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(EngineError, match="runs inside a pod: KUBERNETES_SERVICE_HOST is not set"):
        KubernetesEngine.in_cluster(NAME, "b-0.h:7700", TTL)


async def test_a_lease_held_by_something_not_a_brokerd_is_neither_followed_nor_taken_early(api, token_file, nursery):
    api._store({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": NAME, "namespace": NS, "annotations": {"brokerd.io/epoch": "9" * 40}},
                "spec": {"holderIdentity": "some-other-controller", "leaseDurationSeconds": TTL}})
    a = FakeRoles()
    ea = Elector(engine(api, "b-0.h:7700", token_file), a, "b-0.h:7700", poll=POLL)
    nursery.start_soon(ea.run)
    with trio.fail_after(10):
        while "not a brokerd's HOST:PORT" not in ea._said:
            await trio.sleep(POLL)
        assert [w for _, w, _ in a.events] == ["fence"]
        # nobody renews it: a whole leaseDurationSeconds later (by our clock) it is taken
        promoted = await a.wait_for("promote")
    assert promoted >= a.events[0][0] + TTL
    assert api.lease["spec"]["holderIdentity"] == "b-0.h:7700"
