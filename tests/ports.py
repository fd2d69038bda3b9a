"""A free TCP port for each torchrun/accelerate launch in the tests.

A fixed `--master_port` reused by back-to-back launches can still be held by the previous rendezvous (TIME_WAIT), which
fails the next launch at random; asking the OS for a free port avoids it.
"""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
