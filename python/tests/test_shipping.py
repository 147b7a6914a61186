"""Shipping builds once: the scheduler's store, and the round trip through a real
(in-process) Dask cluster."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from solidflow_dask_bridge import shipping


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(store: shipping.BuildStore, data: bytes, client: str | None, active: set[str]) -> list[str]:
    store.put(sha(data), 0, data[:3])
    store.put(sha(data), 3, data[3:])
    return store.commit(sha(data), client, active)


def test_the_store_keeps_the_most_recently_used_builds(tmp_path: Any) -> None:
    store = shipping.BuildStore(str(tmp_path), keep=2)
    a, b, c = b"build a", b"build b", b"build c"
    assert upload(store, a, None, set()) == []
    assert upload(store, b, None, set()) == []
    assert store.has(sha(a))  # a is now more recent than b
    assert upload(store, c, None, set()) == [sha(b)]
    assert store.builds() == [sha(c), sha(a)]
    assert sorted(os.listdir(tmp_path)) == sorted([sha(a), sha(c)])
    assert not store.has(sha(b))
    assert store.read(sha(a), 2, 3) == b"ild"
    assert store.read(sha(b), 0, 10) is None


def test_a_build_a_connected_client_uses_is_not_evicted(tmp_path: Any) -> None:
    store = shipping.BuildStore(str(tmp_path), keep=1)
    a, b = b"build a", b"build b"
    upload(store, a, "client-1", {"client-1"})
    assert upload(store, b, "client-2", {"client-1", "client-2"}) == []
    assert store.builds() == [sha(b), sha(a)]
    # client-1 went away: the next eviction removes its build.
    assert store.evict({"client-2"}) == [sha(a)]


def test_a_corrupt_or_out_of_order_upload_is_refused(tmp_path: Any) -> None:
    store = shipping.BuildStore(str(tmp_path), keep=3)
    data = b"payload"
    store.put(sha(data), 0, b"pay")
    with pytest.raises(ValueError, match="offset 5, expected 3"):
        store.put(sha(data), 5, b"x")
    store.put(sha(data), 3, b"LOAD")
    with pytest.raises(ValueError, match="arrived with sha256"):
        store.commit(sha(data), None, set())
    assert store.builds() == [] and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="not a sha256"):
        store.put("../etc/passwd", 0, b"")


def test_ship_once_then_fetch_on_first_use(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second ship sends no bytes; a worker has nothing until a task needs the build."""
    import cloudpickle
    from distributed import Client, LocalCluster, get_worker

    cloudpickle.register_pickle_by_value(shipping)
    monkeypatch.setenv(shipping.STORE_ENV, str(tmp_path / "store"))
    monkeypatch.setenv(shipping.CACHE_ENV, str(tmp_path / "cache"))
    binary = tmp_path / "pipeline"
    # Bigger than one chunk, so upload and fetch both go in pieces.
    binary.write_bytes(os.urandom(shipping.CHUNK_BYTES + 1000))
    want = sha(binary.read_bytes())

    def fetch(build: str) -> str:
        return shipping.ensure_build(get_worker(), build)

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        first = shipping.ship(client, str(binary), None, keep=3)
        assert first["cached"] is False and first["bytes_sent"] == binary.stat().st_size
        assert first["kept"] == [want]
        again = shipping.ship(client, str(binary), want, keep=3)
        assert again == {"sha256": want, "cached": True, "bytes_sent": 0, "evicted": [], "kept": [want]}
        assert not (tmp_path / "cache").exists(), "nothing is fetched before a task needs it"
        path = client.submit(fetch, want, pure=False).result()
        assert path == str(tmp_path / "cache" / want)
        assert shipping.sha256_of(path) == want and os.access(path, os.X_OK)
        missing = "0" * 64
        with pytest.raises(RuntimeError, match="not on the Dask scheduler"):
            client.submit(fetch, missing, pure=False).result()
        with pytest.raises(ValueError, match="not .* as requested"):
            shipping.ship(client, str(binary), missing, keep=3)
    assert not (tmp_path / "store").exists() or os.listdir(tmp_path / "store") == [], "closing the scheduler removes it"
