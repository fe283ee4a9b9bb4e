"""The ports tests start servers on never come from the kernel's ephemeral range (where
another test's outgoing connection could take one before the server listens), and two
pytest-xdist workers never share one."""

import socket

from tests.support.ports import LOWEST, ephemeral_low, free_loopback_port, worker_slice


def test_a_port_handed_out_is_below_the_ephemeral_range_and_free():
    seen = set()
    for _ in range(50):
        port = free_loopback_port()
        assert LOWEST <= port < ephemeral_low()
        assert port not in seen  # not handed out twice
        seen.add(port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # nothing listens there


def test_a_port_something_listens_on_is_skipped():
    taken = free_loopback_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", taken))
        listener.listen()
        for _ in range(50):
            assert free_loopback_port() != taken


def test_workers_slices_do_not_overlap():
    high = ephemeral_low()
    slices = [set(worker_slice(worker, 4, high)) for worker in range(4)]
    for first in range(4):
        assert slices[first] and max(slices[first]) < high
        for second in range(first + 1, 4):
            assert not slices[first] & slices[second]
