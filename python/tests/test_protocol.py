"""The protocol's types against the golden fixtures (tests/fixtures/protocol), which the
Rust client's tests check too."""

from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin

from conftest import read_fixture
from solidflow_dask_bridge import protocol, server


def check_type(value: Any, hint: Any, where: str) -> None:
    origin = get_origin(hint)
    if hint is Any:
        return
    if origin is typing.Literal:
        assert value in get_args(hint), "%s: %r not one of %s" % (where, value, get_args(hint))
    elif origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                check_type(value, option, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError("; ".join(errors))
    elif hint is type(None):
        assert value is None, "%s: %r is not null" % (where, value)
    elif origin is list:
        assert isinstance(value, list), "%s: %r is not a list" % (where, value)
        for i, item in enumerate(value):
            check_type(item, get_args(hint)[0], "%s[%d]" % (where, i))
    elif origin is dict:
        assert isinstance(value, dict), "%s: %r is not an object" % (where, value)
        for k, v in value.items():
            check_type(k, get_args(hint)[0], where)
            check_type(v, get_args(hint)[1], "%s.%s" % (where, k))
    elif typing.is_typeddict(hint):
        check_typed_dict(value, hint, where)
    elif hint is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), "%s: %r" % (where, value)
    else:
        assert isinstance(value, hint) and not (hint is int and isinstance(value, bool)), "%s: %r is not %s" % (
            where,
            value,
            hint,
        )


def check_typed_dict(value: Any, cls: Any, where: str) -> None:
    assert isinstance(value, dict), "%s: not an object" % where
    hints = typing.get_type_hints(cls)
    for key in cls.__required_keys__:
        assert key in value, "%s: missing %r" % (where, key)
    for key, item in value.items():
        if key == "id":
            continue  # the echo of a request id, on any reply
        assert key in hints, "%s: unknown field %r" % (where, key)
        check_type(item, hints[key], "%s.%s" % (where, key))


def test_every_fixture_message_has_its_declared_shape() -> None:
    seen = set()
    for msg in read_fixture("bridge-messages.jsonl"):
        cls = protocol.MESSAGES[msg["type"]]
        check_typed_dict(msg, cls, msg["type"])
        seen.add(msg["type"])
    assert seen == set(protocol.MESSAGES), "a message type has no golden example: %s" % (set(protocol.MESSAGES) - seen)


def test_every_fixture_request_is_served() -> None:
    ops = [req["op"] for req in read_fixture("bridge-requests.jsonl")]
    assert set(ops) == set(protocol.OPS)
    for req in read_fixture("bridge-requests.jsonl"):
        assert hasattr(server.Bridge, "op_" + req["op"])
        if req["op"] == "submit":
            check_typed_dict(req, protocol.SubmitRequest, "submit")
        if req["op"] == "cancel":
            check_typed_dict(req, protocol.CancelRequest, "cancel")


def test_the_server_builds_the_fixture_messages() -> None:
    golden = {(m["type"], m.get("key"), m.get("kind")): m for m in read_fixture("bridge-messages.jsonl")}
    done = golden[("done", "train.compute-0ebb33c2-a1", None)]
    record = dict(done, token="t", events=1)
    assert server.done_message(done["key"], record) == done
    for (kind, key, _), msg in golden.items():
        if kind == "failed":
            assert protocol.failed(key, msg["reason"], msg["message"], msg.get("causes")) == msg
        if kind == "error" and "id" not in msg:
            assert protocol.error(msg["kind"], msg["message"], msg.get("causes")) == msg


def test_reason_codes_are_the_literals() -> None:
    assert "not_started" in protocol.FAILURE_REASONS
    assert "internal" in protocol.ERROR_KINDS
    for msg in read_fixture("bridge-messages.jsonl"):
        if msg["type"] == "failed":
            assert msg["reason"] in protocol.FAILURE_REASONS
        if msg["type"] == "error":
            assert msg["kind"] in protocol.ERROR_KINDS


def test_causes_follow_the_exception_chain() -> None:
    try:
        try:
            try:
                raise TypeError("unexpected keyword argument 'nanny_port'")
            except TypeError as e:
                raise RuntimeError("Nanny failed to start.") from e
        except RuntimeError:
            raise protocol.BridgeError("internal", "could not start the cluster")  # noqa: B904
    except protocol.BridgeError as e:
        assert protocol.causes_of(e) == [
            "RuntimeError: Nanny failed to start.",
            "TypeError: unexpected keyword argument 'nanny_port'",
        ]
