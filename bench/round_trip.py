"""What one round trip between two processes costs this machine: the price of each hop a proxied call makes.

    .venv/bin/python bench/round_trip.py

A metered call makes four round trips between processes (the client's to the server, granian handing it to a
Python thread, the upstream's, the charge's statement), and so does bench/proxy.py's floor. Here two Python
processes answer each other 40 bytes over TCP on loopback, as the proxy talks to PostgreSQL and to the upstream:
placed by the kernel, then both pinned to one CPU (no wake-up of the other CPU), each back to back and after a
20 ms idle wait before every trip (the one-caller phase's upstream delay). Prints the wall time and the caller's
CPU per round trip, medians of blocks. On a virtual machine a wake-up across CPUs may cost several times one on
the same CPU: then no code of the proxy's makes its four hops cheap, and its floor shows it.
"""

import os
import socket
import statistics
import time

BACK_TO_BACK_TRIPS = 2000
AFTER_IDLE_TRIPS = 100
IDLE_SECONDS = 0.02
BLOCKS = 5
_QUESTION, _ANSWER = b"q" * 40, b"a" * 40


def _answerer(listener: socket.socket, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while connection.recv(64) == _QUESTION:
        connection.sendall(_ANSWER)


def _block(peer: socket.socket, trips: int, idle: float) -> tuple[float, float]:
    """Wall and CPU microseconds per round trip over `trips`, each after `idle` seconds (not counted as wall)."""
    wall = cpu = 0.0
    for _ in range(trips):
        if idle:
            time.sleep(idle)
        started_cpu, started = time.process_time(), time.perf_counter()
        peer.sendall(_QUESTION)
        peer.recv(64)
        wall += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
    return wall / trips * 1e6, cpu / trips * 1e6


def measure(cpu: int | None) -> dict[str, tuple[float, float]]:
    """{"back to back": (wall µs, CPU µs), "after 20 ms idle": ...} with both processes on `cpu` (None: anywhere)."""
    listener = socket.create_server(("127.0.0.1", 0))
    child = os.fork()
    if child == 0:
        try:
            _answerer(listener, cpu)
        finally:
            os._exit(0)
    address = listener.getsockname()
    listener.close()
    affinity = os.sched_getaffinity(0)
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        with socket.create_connection(address) as peer:
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _block(peer, 100, 0)  # warm-up
            results = {}
            for name, trips, idle in (
                ("back to back", BACK_TO_BACK_TRIPS, 0.0),
                ("after 20 ms idle", AFTER_IDLE_TRIPS, IDLE_SECONDS),
            ):
                blocks = [_block(peer, trips, idle) for _ in range(BLOCKS)]
                results[name] = (
                    statistics.median(wall for wall, _ in blocks),
                    statistics.median(cpu_us for _, cpu_us in blocks),
                )
            peer.sendall(b"x")  # not a question: the answerer stops
    finally:
        os.sched_setaffinity(0, affinity)
        os.waitpid(child, 0)
    return results


def main() -> None:
    print(f"{'processes':<28} {'trips':<18} {'wall µs':>9} {'caller CPU µs':>14}")
    placements = [("placed by the kernel", None)]
    if len(os.sched_getaffinity(0)) > 1:
        placements.append(("both on one CPU", min(os.sched_getaffinity(0))))
    for label, cpu in placements:
        for name, (wall, cpu_us) in measure(cpu).items():
            print(f"{label:<28} {name:<18} {wall:>9.1f} {cpu_us:>14.1f}")


if __name__ == "__main__":
    main()
