"""The scheduler keeps no copies of a run's delivered events (topics.py), against
distributed's own broker."""

from __future__ import annotations

from typing import Any

from distributed.broker import Broker
from solidflow_dask_bridge import topics


class Scheduler:
    """What the broker needs of a scheduler."""

    def __init__(self) -> None:
        self.plugins: dict[str, Any] = {}
        self.sent: list[Any] = []
        self._broker = Broker(1000, self)  # type: ignore[arg-type]

    def send_all(self, client_msgs: dict[str, Any], worker_msgs: dict[str, Any]) -> None:
        self.sent.append(client_msgs)


def test_truncate_forgets_delivered_events_and_drop_removes_the_topic() -> None:
    scheduler = Scheduler()
    broker = scheduler._broker
    broker.subscribe("run-1", "bridge")
    broker.subscribe("run-2", "bridge")
    broker.subscribe("run-2", "someone-else")
    for i in range(3):
        broker.publish("run-1", {"i": i})
    assert len(scheduler.sent) == 3, "subscribers get events when they are published"
    assert topics.truncate(["run-1", "missing"], dask_scheduler=scheduler) == 3
    assert broker.get_events("run-1") == ()
    assert topics.drop(["run-1", "run-2"], "bridge", dask_scheduler=scheduler) == ["run-1"]
    assert "run-1" not in broker._topics
    assert broker._topics["run-2"].subscribers == {"someone-else"}, "a topic someone else reads stays"


def test_without_a_broker_nothing_happens() -> None:
    assert topics.truncate(["t"], dask_scheduler=object()) == 0
    assert topics.drop(["t"], "c", dask_scheduler=object()) == []
