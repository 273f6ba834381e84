"""Where cembed.distributed meets Ray: Ray is imported here, lazily, and only on request; starting
a local Ray is refused outside a network namespace that has nothing but loopback."""
from __future__ import annotations

import socket
from typing import Any, Dict, List, Optional

__all__ = ["require_ray", "init_local", "connect", "network_interfaces", "only_loopback"]


def network_interfaces() -> List[str]:
    """Names of this process's network interfaces (``socket.if_nameindex()``).

    Examples
    --------
    >>> from cembed.distributed import network_interfaces
    >>> isinstance(network_interfaces(), list)
    True
    """
    return [name for _, name in socket.if_nameindex()]


def only_loopback() -> bool:
    """True when this process sees no network interface but ``lo`` (a private network namespace:
    whatever Ray tries to reach at start-up, nothing leaves the machine).

    Examples
    --------
    >>> from cembed.distributed import only_loopback, network_interfaces
    >>> only_loopback() == (network_interfaces() == ["lo"])
    True
    """
    return network_interfaces() == ["lo"]


def require_ray() -> Any:
    """The ``ray`` module, which must be installed (``pip install "ray>=2.40" (the "ray" extra of cembed)``) and initialised."""
    try:
        import ray
    except ImportError:
        raise ImportError('cembed.distributed needs Ray: pip install "ray>=2.40" (the "ray" extra of cembed)') from None
    if not ray.is_initialized():
        raise RuntimeError("Ray is not running in this process: call cembed.distributed.init_local() (inside a "
                           "network namespace with only loopback) or ray.init(address=...) first")
    return ray


def init_local(num_cpus: Optional[int] = None, **kwargs: Any) -> Any:
    """Start a local Ray for this process, bound to 127.0.0.1, without dashboard or usage reports.

    Refused (``RuntimeError``) unless the process is in a network namespace that has only ``lo``:
    Ray contacts outside addresses when it starts. Run under
    ``unshare --net --pid --fork --kill-child --mount-proc -- bash -c 'ip link set lo up && ...'``
    (``tests/ray/run.sh`` does) — ``python -m cembed train --shards S`` re-executes itself that way.

    Returns
    -------
    The ``ray`` module.

    Examples
    --------
    Outside such a namespace the call is refused before Ray is imported:

    >>> from cembed.distributed import init_local, only_loopback
    >>> if not only_loopback():
    ...     try:
    ...         init_local()
    ...     except RuntimeError as exc:
    ...         print("refused")
    ... else:
    ...     print("refused")
    refused
    """
    if not only_loopback():
        raise RuntimeError(f"refusing to start Ray: this process sees network interfaces {network_interfaces()}, "
                           "not only 'lo'. Start it inside a private network namespace: unshare --net --pid --fork "
                           "--kill-child --mount-proc -- bash -c 'ip link set lo up && RAY_USAGE_STATS_ENABLED=0 ...'")
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        options: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        options.update(kwargs)
        ray.init(num_cpus=num_cpus, **options)
    return ray


def connect(address: str, **kwargs: Any) -> Any:
    """Connect this process to the running Ray cluster at ``address`` (``ray.init(address=...)``);
    returns the ``ray`` module. Whether that cluster's network is confined is the caller's business.

    Examples
    --------
    Needs a running cluster; not run here:

    >>> from cembed.distributed import connect
    >>> ray = connect("127.0.0.1:6379")        # doctest: +SKIP
    """
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ImportError('cembed.distributed needs Ray: pip install "ray>=2.40" (the "ray" extra of cembed)') from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, **kwargs)
    return ray
