"""What the bridge does with a lost scheduler connection, and with a removed worker."""

from __future__ import annotations

from typing import Any

from solidflow_dask_bridge import cluster_events, connection


class FakeClient:
    """Only the status distributed's Client reports."""

    def __init__(self, status: str) -> None:
        self.status = status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch_for(client: FakeClient, clock: Clock) -> tuple[connection.ConnectionWatch, list[Any], list[Any]]:
    resubmitted: list[Any] = []
    failed: list[Any] = []
    watch = connection.ConnectionWatch(
        "tcp://127.0.0.1:8786",
        5.0,
        lambda: client,
        lambda keys, lost_for: resubmitted.append((keys, lost_for)),
        lambda key, message: failed.append((key, message)),
        clock=clock,
    )
    return watch, resubmitted, failed


def test_tasks_lost_with_the_connection_are_resubmitted_when_it_comes_back() -> None:
    client, clock = FakeClient("connecting"), Clock()
    watch, resubmitted, failed = watch_for(client, clock)
    watch._keys, watch._since = ["a", "b"], clock.now  # as lost() records them, without its thread
    clock.now += 2
    assert not watch.step(), "still reconnecting, within the timeout"
    client.status = "running"
    clock.now += 1
    assert watch.step()
    assert resubmitted == [(["a", "b"], 3.0)] and failed == []


def test_tasks_fail_as_lost_when_the_connection_does_not_come_back_in_time() -> None:
    client, clock = FakeClient("connecting"), Clock()
    watch, resubmitted, failed = watch_for(client, clock)
    watch._keys, watch._since = ["a"], clock.now
    clock.now += 6
    assert watch.step()
    assert resubmitted == []
    [(key, message)] = failed
    assert key == "a"
    assert message.startswith("lost the connection to the Dask scheduler at tcp://127.0.0.1:8786 for 6 s"), message


def test_a_closed_client_fails_at_once() -> None:
    client, clock = FakeClient("closed"), Clock()
    watch, _, failed = watch_for(client, clock)
    watch._keys, watch._since = ["a"], clock.now
    assert watch.step() and [k for k, _ in failed] == ["a"]
    assert connection.is_connection_lost(None) and not connection.is_connection_lost(FakeClient("running"))


def test_removed_workers_name_only_our_processing_tasks() -> None:
    event = (
        1.0,
        {"action": "remove-worker", "worker": "tcp://127.0.0.1:4000", "processing-tasks": {"ours", "theirs"}},
    )
    messages = cluster_events.worker_lost_messages(event, lambda k: k == "ours")
    assert messages == [{"type": "worker_lost", "key": "ours", "worker": "tcp://127.0.0.1:4000"}]
    assert cluster_events.worker_lost_messages((1.0, {"action": "add-worker"}), lambda k: True) == []
    assert cluster_events.worker_lost_messages("junk", lambda k: True) == []
