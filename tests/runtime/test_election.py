"""Election through a real etcd (started here on loopback ports), with fake roles objects.

The roles API (promote/follow/fence/role/epoch/last_lsn) is faked so that these tests are
fast and record *when* each brokerd was fenced or promoted; the e2e test with two real
brokerd processes lives in tests/e2e/test_election_failover.py.
"""

from __future__ import annotations

import base64
import itertools

import pytest
import trio

from broker import config as election_config
from broker.runtime import election
from broker.runtime.election import Elector, EtcdEngine, fence_margin
from tests.support.etcd import EtcdProcess, etcd_binary

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (apt-get install etcd-server; "
                                                                ".ci/run does it)")

TTL = 2  # seconds: etcd's smallest lease with its default timings, so the tests stay short
POLL = 0.05  # seconds: candidates notice a free leadership quickly
_prefix = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture
def prefix():
    return f"/brokerd-test-{next(_prefix)}"


class FakeRoles:
    """The runtime's roles API, recording (time, what, detail) for each call."""

    def __init__(self, lsn: int = 0):
        self.role = "follower"
        self.epoch = 0
        self.lsn = lsn
        self.fenced = False
        self.lease_valid = None  # what the elector gave guard_confirms
        self.events: list[tuple[float, str, object]] = []
        self.changed = trio.Event()

    def _note(self, what, detail=None):
        self.events.append((trio.current_time(), what, detail))
        self.changed.set()
        self.changed = trio.Event()

    async def promote(self, reason: str) -> int:
        assert self.role != "leader" or self.fenced, "promoted while leading"
        self.role, self.fenced = "leader", False
        self.epoch += 1
        self._note("promote", self.epoch)
        return self.epoch

    async def follow(self, address: str, reason: str) -> None:
        self.role = "follower"
        self._note("follow", address)

    def fence(self, reason: str = "") -> None:
        self.fenced = True
        self._note("fence")

    def last_lsn(self) -> int:
        return self.lsn

    def guard_confirms(self, lease_valid) -> None:
        self.lease_valid = lease_valid

    def first_after(self, what: str, t: float) -> float | None:
        return next((x for x in self.times(what) if x > t), None)

    def times(self, what: str) -> list[float]:
        return [t for t, w, _ in self.events if w == what]

    async def wait_for(self, what: str, detail=None, count: int = 1) -> float:
        """The time of the count-th ``what`` (with ``detail``, when given)."""
        while True:
            hits = [t for t, w, d in self.events if w == what and (detail is None or d == detail)]
            if len(hits) >= count:
                return hits[count - 1]
            await self.changed.wait()


class NoRelease(EtcdEngine):
    """A leader that cannot reach etcd to give its lease back: the others must wait for it to expire."""

    async def release(self) -> None:
        self.lease_id = None


def engine(etcd, prefix, cls=EtcdEngine):
    return cls([("127.0.0.1", etcd.port)], prefix, TTL)


def etcd_get(etcd, key: str) -> bytes | None:
    kvs = etcd.request("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()}).get("kvs")
    return base64.b64decode(kvs[0]["value"]) if kvs else None


async def test_one_of_two_candidates_wins_and_the_other_follows_it(etcd, prefix):
    a, b = FakeRoles(), FakeRoles()
    ea = Elector(engine(etcd, prefix), a, "127.0.0.1:7001", poll=POLL)
    eb = Elector(engine(etcd, prefix), b, "127.0.0.1:7002", poll=POLL)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ea.run)
            nursery.start_soon(eb.run)
            while not (a.times("promote") or b.times("promote")):
                await trio.sleep(POLL)
            winner, loser, address = (a, b, "127.0.0.1:7001") if a.times("promote") else (b, a, "127.0.0.1:7002")
            await loser.wait_for("follow", address)
            # both started fenced: nothing was written before the engine said who leads
            assert a.events[0][1] == "fence" and b.events[0][1] == "fence"
            assert not loser.times("promote"), "both candidates were promoted"
            assert winner.role == "leader" and loser.role == "follower"
            # the leader key names the winner and the epoch it was promoted to
            while b'"epoch":1' not in (etcd_get(etcd, prefix + "/leader") or b""):
                await trio.sleep(POLL)
            assert address.encode() in etcd_get(etcd, prefix + "/leader")
            nursery.cancel_scope.cancel()
    # stopping the winner's elector fenced it and gave the lease back at once
    assert winner.events[-1][1] == "fence"
    assert etcd_get(etcd, prefix + "/leader") is None


async def test_a_leader_whose_renewals_stop_is_fenced_before_the_other_is_promoted(etcd, prefix):
    a, b = FakeRoles(), FakeRoles()
    ea = Elector(engine(etcd, prefix, NoRelease), a, "127.0.0.1:7001", poll=POLL)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ea.run)
            await a.wait_for("promote")  # a leads alone; b starts after, so it follows
            eb = Elector(engine(etcd, prefix), b, "127.0.0.1:7002", poll=POLL)
            nursery.start_soon(eb.run)
            await b.wait_for("follow", "127.0.0.1:7001")
            while ea.renew_scope is None:
                await trio.sleep(POLL)
            last_renewal = ea.renewed_at
            ea.renew_scope.cancel()  # the renewing task dies; a cannot give its lease back either
            promoted = await b.wait_for("promote")
            fenced = a.first_after("fence", a.times("promote")[0])
            assert fenced is not None and fenced < promoted, "b was promoted while a could still confirm writes"
            # a fenced on its own timer, ttl - margin after the last renewal it sent ...
            assert fenced <= last_renewal + TTL - fence_margin(TTL) + 0.5
            # ... and b won only once etcd let the lease expire, a whole ttl after that renewal
            assert promoted >= last_renewal + TTL
            # a, fenced, follows the new leader (after its back-off it does not fight for the lease)
            await a.wait_for("follow", "127.0.0.1:7002")
            assert len(a.times("promote")) == 1
            nursery.cancel_scope.cancel()


async def test_a_leader_holds_its_confirms_from_the_fence_time_even_before_its_watchdog_runs(etcd, prefix):
    """The guard the elector gives roles (asked right before held replies go out, in Durability) is
    True while the lease is safely held and False from the fence time on, whoever runs first after a
    pause: the watchdog or the writer with replies in hand (tests/runtime/test_roles.py shows the
    writer side)."""
    a = FakeRoles()
    ea = Elector(engine(etcd, prefix, NoRelease), a, "127.0.0.1:7001", poll=POLL)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ea.run)
            await a.wait_for("promote")
            guard = a.lease_valid
            assert guard is not None and guard()
            while ea.renew_scope is None:
                await trio.sleep(POLL)
            ea.renew_scope.cancel()  # no more renewals: the fence time stays where it is
            fence_at = ea.fence_at
            await trio.sleep_until(fence_at - 0.2)
            assert guard(), "the guard closed before the fence time"
            await trio.sleep_until(fence_at)
            assert not guard(), "a confirm could still go out past the fence time"
            await a.wait_for("fence", count=2)  # the watchdog's (the first fence is the start's)
            while a.lease_valid is not None:  # the term ended: the guard is taken away
                await trio.sleep(POLL)
            nursery.cancel_scope.cancel()


async def test_a_candidate_behind_the_confirmed_lsn_does_not_campaign(etcd, prefix):
    # a leader (lsn 500) publishes its confirmed lsn on each renewal
    lead = FakeRoles(lsn=500)
    el = Elector(engine(etcd, prefix), lead, "127.0.0.1:7001", poll=POLL)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(el.run)
            await lead.wait_for("promote")
            while etcd_get(etcd, prefix + "/confirmed") != b"%020d" % 500:
                await trio.sleep(POLL)
            lead.lsn = 400  # a lower value never lowers what was published (it is monotonic)
            seen = el.renewed_at
            while el.renewed_at == seen:
                await trio.sleep(POLL)
            await trio.sleep(0.2)  # the publication that follows that renewal
            assert etcd_get(etcd, prefix + "/confirmed") == b"%020d" % 500
            nursery.cancel_scope.cancel()  # the leader stops (and releases): the leadership is free

        assert etcd_get(etcd, prefix + "/leader") is None
        behind = FakeRoles(lsn=499)
        eb = Elector(engine(etcd, prefix), behind, "127.0.0.1:7002", poll=POLL)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(eb.run)
            while "not campaigning" not in eb._said:
                await trio.sleep(POLL)
            rounds_behind = 3
            for _ in range(rounds_behind):  # it stays out, round after round
                await trio.sleep(POLL * 2)
                assert etcd_get(etcd, prefix + "/leader") is None
            assert not behind.times("promote")
            assert "lsn 499" in eb._said and "confirmed lsn 500" in eb._said
            behind.lsn = 500  # caught up: now it may win
            await behind.wait_for("promote")
            nursery.cancel_scope.cancel()


async def test_a_leader_that_cannot_reach_etcd_fences_within_the_ttl(etcd, prefix):
    a = FakeRoles()
    ea = Elector(engine(etcd, prefix), a, "127.0.0.1:7001", poll=POLL)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ea.run)
                await a.wait_for("promote")
                seen = ea.renewed_at
                while ea.renewed_at == seen:  # one renewal went through
                    await trio.sleep(POLL)
                last_renewal = ea.renewed_at
                etcd.pause()  # SIGSTOP: requests hang, nothing answers
                fenced = await a.wait_for("fence", count=2)  # the first fence is the one at start
                assert fenced - last_renewal < TTL, "fenced only after the lease could have expired"
                assert fenced - last_renewal >= TTL - fence_margin(TTL) - 0.01
                assert a.fenced
                nursery.cancel_scope.cancel()
    finally:
        etcd.resume()


def test_election_urls_are_checked_with_a_clear_error():
    assert election_config.parse_election("etcd://10.0.0.9:2379/brokerd") == ("etcd", [("10.0.0.9", 2379)], "/brokerd")
    assert election_config.parse_election("etcd://a:1,b:2/x/y/") == ("etcd", [("a", 1), ("b", 2)], "/x/y")
    assert election_config.parse_election("kubernetes") == ("kubernetes", election_config.KUBE_LEASE_NAME)
    assert election_config.parse_election("kubernetes:my-lease") == ("kubernetes", "my-lease")
    for bad, words in [("etcd://10.0.0.9:2379", "prefix"), ("etcd://10.0.0.9/brokerd", "HOST:PORT"),
                       ("etcd://h:99999/p", "HOST:PORT"), ("zookeeper://h:1/p", "etcd://HOST:PORT/PREFIX"),
                       ("kubernetes:Bad_Name", "Kubernetes object name"), ("etcd://h:1/a b", "without spaces")]:
        with pytest.raises(ValueError, match=words):
            election_config.parse_election(bad)


async def test_a_leader_record_that_is_not_a_brokerds_is_neither_followed_nor_overwritten(etcd, prefix):
    key = base64.b64encode((prefix + "/leader").encode()).decode()
    a = FakeRoles()
    ea = Elector(engine(etcd, prefix), a, "127.0.0.1:7001", poll=POLL)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for hostile in (b"\xff\xfe not json", b'{"address": "evil host:1; rm -rf", "epoch": -5}',
                            b'{"address": "' + b"h" * 5000 + b':1"}', b"[1, 2]"):
                etcd.request("/v3/kv/put", {"key": key, "value": base64.b64encode(hostile).decode()})
                if not ea._said:
                    nursery.start_soon(ea.run)
                while "not a brokerd's HOST:PORT" not in ea._said:
                    await trio.sleep(POLL)
                await trio.sleep(POLL * 3)  # a few more rounds: it still waits
                assert etcd_get(etcd, prefix + "/leader") == hostile  # never overwritten
                assert [w for _, w, _ in a.events] == ["fence"], "it followed or campaigned on a foreign record"
            etcd.request("/v3/kv/deleterange", {"key": key})  # the record goes away: the election goes on
            await a.wait_for("promote")
            nursery.cancel_scope.cancel()


def test_answers_that_are_not_http_are_engine_errors_not_crashes():
    from broker.runtime.election import EngineError, parse_response

    assert parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "x") == (200, b"{}")
    assert parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "x") == (200, b"{}")
    for raw, words in [(b"", "ended before its headers"), (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 answer"),
                       (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "cut off"),
                       (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}", "broken chunked"),
                       (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\n{}", "cut off")]:
        with pytest.raises(EngineError, match=words):
            parse_response(raw, "x")


async def test_an_endless_answer_is_cut_at_the_limit(nursery):
    import functools

    from broker.runtime.election import MAX_RESPONSE_BYTES, EngineError, http_call

    async def flood(stream):
        await stream.receive_some(65536)
        chunk = b"x" * 65536
        try:
            while True:
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, flood, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    with pytest.raises(EngineError, match=f"more than {MAX_RESPONSE_BYTES} bytes"):
        await http_call("127.0.0.1", port, "POST", "/v3/kv/range", b"{}", timeout=10)
