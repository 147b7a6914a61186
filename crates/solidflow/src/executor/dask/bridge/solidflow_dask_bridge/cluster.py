"""Creating or joining a Dask cluster: the `connect` request."""

from __future__ import annotations

import sys
from typing import Any

from . import probe
from .protocol import BridgeError
from .worker import set_allowed_failures

# Beyond `timeout`, how long distributed's Client may take to finish connecting to an
# address that passed the probe before the connect is given up.
JOIN_MARGIN_SECONDS = 10.0

CLUSTER_MANAGERS: dict[str, tuple[str, str, str]] = {
    # kind: (module, class, pip package)
    "slurm": ("dask_jobqueue", "SLURMCluster", "dask-jobqueue"),
    "pbs": ("dask_jobqueue", "PBSCluster", "dask-jobqueue"),
    "sge": ("dask_jobqueue", "SGECluster", "dask-jobqueue"),
    "lsf": ("dask_jobqueue", "LSFCluster", "dask-jobqueue"),
    "kube": ("dask_kubernetes.operator", "KubeCluster", "dask-kubernetes"),
    "ssh": ("distributed", "SSHCluster", "asyncssh"),
    "yarn": ("dask_yarn", "YarnCluster", "dask-yarn"),
}


def connect(req: dict[str, Any]) -> tuple[Any, Any, bool]:
    """Creates or joins the cluster `req` names; returns (client, cluster, created)."""
    import dask
    from distributed import Client

    address = req.get("address")
    timeout = float(req.get("timeout") or 30)
    cluster_spec = req.get("cluster") or {}
    kind = cluster_spec.get("kind") or ("existing" if address else "local")
    options = dict(cluster_spec.get("options") or {})
    allowed_failures = req.get("allowed_failures")
    cluster = None
    client = None

    if kind == "existing":
        if not address:
            raise BridgeError("bad_request", "cluster kind 'existing' needs an address")
        client = _join(address, timeout, security(req.get("tls")))
        if allowed_failures is not None:
            # Shared scheduler: this changes the setting for every client of it.
            client.run_on_scheduler(set_allowed_failures, int(allowed_failures))
    elif address:
        raise BridgeError(
            "bad_request",
            "both address %r and cluster kind %r given: use kind 'existing' "
            "(or omit cluster) to connect to a running scheduler" % (address, kind),
        )
    elif kind == "local":
        cluster = local_cluster(req, options, allowed_failures)
    elif kind in CLUSTER_MANAGERS:
        if allowed_failures is not None:
            dask.config.set({"distributed.scheduler.allowed-failures": int(allowed_failures)})
        cluster = managed_cluster(kind, options)
        if cluster_spec.get("adapt"):
            cluster.adapt(**cluster_spec["adapt"])
        elif req.get("n_workers"):
            cluster.scale(int(req["n_workers"]))
    else:
        raise BridgeError(
            "bad_request",
            "unknown cluster kind %r (expected local, existing, %s)" % (kind, ", ".join(sorted(CLUSTER_MANAGERS))),
        )

    wait_for = req.get("wait_for_workers")
    if client is None:
        client = Client(cluster, set_as_default=False)
        if wait_for is None and kind == "local":
            wait_for = len(cluster.workers)
    if wait_for:
        try:
            client.wait_for_workers(int(wait_for), timeout=timeout)
        except (TimeoutError, OSError) as e:
            where = " %s" % address if address else ""
            raise BridgeError(
                "workers_timeout",
                "%d worker(s) did not join%s within %g s: %s" % (int(wait_for), where, timeout, e),
            ) from e
    return client, cluster, cluster is not None


def _join(address: str, timeout: float, sec: Any) -> Any:
    from distributed import Client

    probe.check_scheduler(address, timeout)
    try:
        return _within(
            timeout + JOIN_MARGIN_SECONDS,
            lambda: Client(address, timeout="%ss" % timeout, security=sec, set_as_default=False),
        )
    except (OSError, TimeoutError) as e:
        raise BridgeError(
            "scheduler_unreachable",
            "could not reach the Dask scheduler at %s within %g s: %s" % (address, timeout, e),
        ) from e
    except TypeError as e:
        # distributed's words for "tls:// without certificates" are a TypeError
        # about a missing ssl_context.
        if sec is None and str(address).startswith("tls://"):
            raise BridgeError(
                "tls_config",
                "the scheduler address %s uses TLS, but no TLS certificate files "
                "were given: add `tls: {ca_file, cert, key}` to the dask executor "
                "config (distributed said: %s)" % (address, e),
            ) from e
        raise


def _within(seconds: float, make: Any) -> Any:
    """`make()`, or TimeoutError when it takes longer than `seconds` (it then finishes,
    or not, on a daemon thread that the bridge's exit ends)."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = make()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="solidflow-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError("the connection was not established within %g s" % seconds)
    if "error" in box:
        raise box["error"]
    return box["value"]


def security(tls: dict[str, Any] | None) -> Any:
    """distributed's Security for the client side of a tls:// scheduler."""
    if not tls:
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=tls.get("ca_file"),
        tls_client_cert=tls.get("cert"),
        tls_client_key=tls.get("key"),
        require_encryption=True,
    )


def local_cluster(req: dict[str, Any], options: dict[str, Any], allowed_failures: int | None) -> Any:
    """A LocalCluster on 127.0.0.1, or a SpecCluster when workers differ in resources."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    scheduler_kwargs = dict(options.pop("scheduler_kwargs", None) or {})
    if allowed_failures is not None:
        scheduler_kwargs["allowed_failures"] = int(allowed_failures)
    resources = req.get("worker_resources")
    threads = req.get("threads_per_worker")
    memory_limit = req.get("memory_limit")
    if isinstance(resources, list):
        # Workers differ: LocalCluster's resources= would apply to all of them.
        worker_options: dict[str, Any] = {"host": "127.0.0.1"}
        if threads:
            worker_options["nthreads"] = int(threads)
        if memory_limit is not None:
            worker_options["memory_limit"] = memory_limit
        worker_options.update(options.pop("worker_options", None) or {})
        workers = {
            "solidflow-%d" % i: {"cls": Nanny, "options": dict(worker_options, resources=dict(r or {}))}
            for i, r in enumerate(resources)
        }
        scheduler_options = {"host": "127.0.0.1", "dashboard_address": ":0"}
        scheduler_options.update(scheduler_kwargs)
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": scheduler_options}, **options)
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "dashboard_address": ":0", "scheduler_kwargs": scheduler_kwargs}
    if req.get("n_workers") is not None:
        kwargs["n_workers"] = int(req["n_workers"])
    if threads:
        kwargs["threads_per_worker"] = int(threads)
    if memory_limit is not None:
        kwargs["memory_limit"] = memory_limit
    if resources:
        kwargs["resources"] = dict(resources)
    kwargs.update(options)
    return LocalCluster(**kwargs)


def managed_cluster(kind: str, options: dict[str, Any]) -> Any:
    """A cluster from a manager package (dask-jobqueue, dask-kubernetes, ...)."""
    import importlib
    import importlib.util

    module_name, class_name, package = CLUSTER_MANAGERS[kind]
    fix = "%s -m pip install %s" % (sys.executable, package)
    if kind == "ssh" and importlib.util.find_spec("asyncssh") is None:
        raise BridgeError(
            "missing_package",
            "cluster kind 'ssh' needs the Python package asyncssh, which is not installed for %s; run `%s`"
            % (sys.executable, fix),
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BridgeError(
            "missing_package",
            "cluster kind %r needs the Python package %s (%s); run `%s`" % (kind, package, e, fix),
        ) from e
    cls = getattr(module, class_name)
    return cls(**options)
