"""A TCP port that accepts connections and never answers: a collector that hangs."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Self

__all__ = ["Blackhole"]


class Blackhole:
    """Listens on a free loopback port; the kernel completes handshakes, nobody reads."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
