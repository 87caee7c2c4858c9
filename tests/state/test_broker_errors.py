"""The broker's errors are typed: one class per wire code, raised by the state and caught by class."""

import ast
from pathlib import Path

import pytest

from broker import errors
from broker.errors import (
    BY_CODE,
    BadRequest,
    BrokerError,
    NotFound,
    PreconditionFailed,
    QueueFull,
    StaleDelivery,
)
from broker.state import BrokerState
from client.wire import ERROR_CODES

BROKER = Path(__file__).resolve().parents[2] / "broker"


def test_every_broker_error_class_maps_to_one_wire_code():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BrokerError) and c is not BrokerError]
    assert classes, "broker.errors defines no error classes"
    for cls in classes:
        assert cls.code in ERROR_CODES, f"{cls.__name__}.code {cls.code!r} is not in client.wire.ERROR_CODES"
        assert BY_CODE[cls.code] is cls, f"{cls.__name__} and {BY_CODE[cls.code].__name__} share {cls.code}"


def codes_in_source() -> dict[str, str]:
    """Every wire error code written as a string literal under broker/, with a file that writes it."""
    found = {}
    for path in sorted(BROKER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is str and node.value in ERROR_CODES:
                found.setdefault(node.value, path.relative_to(BROKER.parent).as_posix())
    return found


def test_every_code_the_broker_sends_has_a_class():
    missing = {code: where for code, where in codes_in_source().items() if code not in BY_CODE}
    assert not missing, f"codes sent without a class in broker.errors: {missing}"
    # and every code brokerd may send (the whole table) has one
    assert set(ERROR_CODES) - set(BY_CODE) == set()


def test_the_state_raises_no_untyped_broker_errors():
    # BrokerError(message, "CODE") and exc.code == "..." were the untyped forms.
    for path in sorted((BROKER / "state").rglob("*.py")) + sorted((BROKER / "handlers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "BrokerError":
                raise AssertionError(f"{path.name}:{node.lineno} raises the untyped BrokerError; raise its class")
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "code":
                raise AssertionError(f"{path.name}:{node.lineno} compares an error code by value; catch the class")


def test_the_state_raises_the_class_of_each_failure():
    s = BrokerState()
    s.connect(1)
    with pytest.raises(NotFound, match=r"^queue 'nope' does not exist$"):
        s.existing_queue("nope")
    s.declare("q", {"max_length": 1, "overflow": "reject"}, 0.0)
    with pytest.raises(PreconditionFailed, match="already exists with options"):
        s.declare("q", {"max_length": 2}, 0.0)
    s.publish(1, "q", b"a", None, 0, 0.0)
    with pytest.raises(QueueFull, match=r"^queue 'q' is full \(1 messages, overflow=reject\)"):
        s.publish(1, "q", b"b", None, 0, 0.0)
    with pytest.raises(StaleDelivery, match="is not in flight on this connection"):
        s.ack(1, 12345, 0.0)
    with pytest.raises(BadRequest, match="a delivery tag is a whole number"):
        s.ack(1, "x", 0.0)
    assert (StaleDelivery.code, QueueFull.code, NotFound.code) == ("STALE_DELIVERY", "QUEUE_FULL", "NOT_FOUND")


def test_maps_off_the_wire_with_keys_of_mixed_types_get_a_bad_request_not_a_crash():
    # A CBOR map may mix text and integer keys; naming the unknown one sorted them, and sorting
    # '' against 0 raised TypeError inside the handler (found by the hostile-frame fuzz test).
    from broker.state.schedules import _check_raw_message

    s = BrokerState()
    s.connect(1)
    with pytest.raises(BadRequest, match="CONSUME option .* is not known"):
        s.consume(1, ["fz"], 5, 0.0, {"": None, 0: None})
    with pytest.raises(BadRequest, match="unknown key"):
        _check_raw_message({"body": b"x", 0: 1, "z": 2}, "body")
