"""Admin text output under hostile data: user values never forge lines.

Message ids, task names, worker hostnames and exceptions come from clients; the
admin protocol is line-based (protocol.md §7), so a CR or LF inside a value
would let its author print a fake ``END`` and fake replies after it.  A real
brokerd is fed such values over the binary protocol and read back as ``nc``
would read it.
"""

from __future__ import annotations

from hypothesis import given, strategies as st

from broker.handlers.admin import clean, multi
from client import wire
from tests.support.wireclient import Raw

FORGED = "m1\r\nEND\r\nOK 0 queues\nEND\x1b[2J\u2028\x85"


def lines_of(reply: str) -> list[str]:
    assert reply.endswith("\r\n"), reply
    return reply[:-2].split("\r\n")


def test_peek_of_a_message_id_with_crlf_prints_one_reply_with_the_id_escaped(broker):
    c = Raw(broker.port)
    try:
        f = c.call(wire.OP_PUBLISH, "evilq", b"body", FORGED, 0, None)
        assert f[0] == wire.OP_OK, f
    finally:
        c.close()
    reply = broker.admin("PEEK evilq\n")
    lines = lines_of(reply)
    assert lines[0] == "OK 1 of 1 ready in evilq"
    assert lines[-1] == "END" and lines.count("END") == 1, reply
    assert not any(line.startswith("OK 0 queues") for line in lines), reply
    assert len(lines) == 4, reply  # OK, the header, one message row, END
    assert "\\r\\nEND\\r\\nOK 0 queues\\nEND\\x1b[2J\\u2028\\x85" in lines[2]
    # nothing a terminal would obey, and no Unicode line break a viewer would honour
    assert all(line.isprintable() for line in lines), reply


def test_task_names_hostnames_and_exceptions_from_events_are_escaped(broker):
    c = Raw(broker.port)
    try:
        f = c.call(wire.OP_EMIT_EVENTS, "host\r\nEND", [
            {"type": "task-received", "uuid": "t1", "ts": 1.0, "name": "evil\nEND\r\nOK forged",
             "args": "()", "kwargs": "{}", "queue": "q", "retries": 0},
            {"type": "task-failed", "uuid": "t1", "ts": 2.0, "runtime": 0.1,
             "exception": "ValueError('a\\nb')\r\nEND", "traceback": "Traceback\r\nEND\x1b]0;x\x07\n  line"},
        ])
        assert f[0] == wire.OP_OK, f
    finally:
        c.close()
    for command in ("TASK t1\n", "WORKERS\n"):
        reply = broker.admin(command)
        lines = lines_of(reply)
        assert lines[0].startswith("OK ") and lines[-1] == "END" and lines.count("END") == 1, reply
        assert not any(line.startswith("OK forged") for line in lines), reply
        assert all(line.isprintable() for line in lines), reply
    assert "evil\\nEND\\r\\nOK forged" in broker.admin("TASK t1\n")


def test_an_error_naming_a_hostile_argument_stays_one_line(broker):
    reply = broker.admin("RESULT a\x1b[2J\x0bEND\n")
    lines = lines_of(reply)
    assert len(lines) >= 3 and lines[-1] == "END" and lines.count("END") == 1, reply
    assert all(line.isprintable() for line in lines), reply


@given(st.text())
def test_clean_leaves_one_printable_line_and_keeps_printable_text(text):
    out = clean(text)
    assert out.isprintable() and len(out.splitlines()) <= 1
    if text.isprintable():
        assert out == text
    reply = multi(text, [text, text])
    assert reply.count("\r\n") == 4 and reply.endswith("END\r\n")
