"""Port choice of ``tooling.local_cluster``: ``ray start`` exits 1 when two components share a port or a
component port falls inside the worker-port range, so both must be impossible by construction."""

from __future__ import annotations

from pathlib import Path

from tooling.local_cluster import free_ports, worker_port_range


def test_free_ports_are_distinct_and_bindable() -> None:
    import socket

    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", port))


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    """Outgoing connections take ephemeral ports, so a port drawn there could be gone before Ray binds it."""
    low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(20000 <= p < low_ephemeral for p in free_ports(200))


def test_a_port_in_use_is_never_drawn() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", free_ports(1)[0]))
        held.listen()
        taken = held.getsockname()[1]
        for _ in range(20):
            assert taken not in free_ports(500)


def test_worker_range_is_below_the_ephemeral_range_and_ray_defaults() -> None:
    low, high = worker_port_range()
    assert high - low + 1 == 100
    assert low >= 20000  # above Ray's default worker range 10002-19999
    low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert high < low_ephemeral
    assert not [p for p in free_ports(200) if low <= p <= high]
