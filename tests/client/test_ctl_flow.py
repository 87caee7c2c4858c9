"""brokerd-ctl rate-limit (issue 15): show and set rate limits against a real brokerd."""

from __future__ import annotations

import json

from client import ctl
from client.producer import Client


def run(capsys, address, *args):
    code = ctl.main(["-b", address, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_rate_limit_sets_a_task_and_a_queue_and_lists_them(broker, capsys):
    with Client(broker.address) as c:
        c.declare("emails")
    code, out, err = run(capsys, broker.address, "rate-limit", "proj.tasks.send_sms", "5/s")
    assert (code, err) == (0, "") and out.strip() == "OK task proj.tasks.send_sms limited to 5/s (was no limit)"
    code, out, _ = run(capsys, broker.address, "--json", "rate-limit", "--queue", "emails", "100/m")
    assert code == 0 and json.loads(out) == {"kind": "queue", "name": "emails", "limit": "100/m", "previous": None}
    code, out, _ = run(capsys, broker.address, "--json", "rate-limit")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["proj.tasks.send_sms"]["limit"] == "5/s" and rows["emails"]["limit"] == "100/m"
    code, out, err = run(capsys, broker.address, "rate-limit", "proj.tasks.send_sms", "fast")
    assert code == 1 and "not a rate" in err
    code, out, err = run(capsys, broker.address, "rate-limit", "proj.tasks.send_sms")
    assert code == 1 and "needs a LIMIT" in err
