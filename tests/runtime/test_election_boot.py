"""--election's flags as brokerd takes them, and /ready/leader (the probe only the leader passes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from broker import cli
from tests.runtime.test_http import get_json
from tests.support.broker import ROOT


def test_a_wrong_election_setting_stops_brokerd_with_a_usage_error_naming_it(tmp_path, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("BROKERD_")]:
        monkeypatch.delenv(name)

    def brokerd_exit(*args: str) -> tuple[int, str]:
        code = cli.main(["--port", "0", "--data-dir", str(tmp_path / "d"), *args])  # refused before it opens anything
        return code, capsys.readouterr().err

    for args, words in [
        (["--election", "etcd://10.0.0.9/brokerd"], "election: '10.0.0.9' is not HOST:PORT"),
        (["--election", "etcd://10.0.0.9:2379"], "election: names no key prefix"),
        (["--election", "consul://h:8500/x"], "election: must be etcd://HOST:PORT/PREFIX"),
        (["--election", "etcd://h:2379/p", "--follow", "h:7700"], "follow: with --election the election decides"),
        (["--election", "kubernetes", "--host", "0.0.0.0", "--insecure-no-auth"], "advertise: with --election and --host 0.0.0.0"),
        (["--advertise", "no-port"], "advertise: must be the HOST:PORT"),
        (["--election-ttl", "1"], "election_ttl: must be a whole number of seconds from 2 to 60"),
    ]:
        code, err = brokerd_exit(*args)
        assert code == 2, (args, err)
        assert words in err, (args, err)


def test_ready_leader_is_200_on_the_leader_and_503_on_a_follower(broker_factory):
    leader = broker_factory()
    follower = broker_factory("--follow", f"127.0.0.1:{leader.port}")
    assert get_json(leader.http_port, "/ready/leader") == (200, {"status": "leader"})
    status, body = get_json(follower.http_port, "/ready/leader")
    assert status == 503 and body["status"] == "not_leader"
    # /readyz stays 200 on both: the follower is a healthy standby, it only does not lead
    assert get_json(follower.http_port, "/readyz")[0] == 200


def test_ready_leader_needs_no_login_on_a_broker_with_users(broker_factory, tmp_path):
    users = tmp_path / "users.toml"
    subprocess.run([sys.executable, "-m", "client.ctl", "user", "add", "alice", "--users-file", str(users),
                    "--grant", "admin=*"], cwd=ROOT, check=True, capture_output=True, timeout=30)
    b = broker_factory("--users-file", str(users))
    status, body = get_json(b.http_port, "/ready/leader")
    assert (status, body) == (200, {"status": "leader"}), json.dumps(body)
