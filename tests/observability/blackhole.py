"""A TCP port that accepts connections and never answers: a collector that hangs."""

from __future__ import annotations

import socket

from tests.fakes.loopback import Running

__all__ = ["Blackhole"]


class Blackhole(Running):
    """Listens on a free loopback port; the kernel completes handshakes, nobody reads."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._socket.close()
