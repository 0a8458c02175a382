"""A stand-in for grpc.aio's ServicerContext, for driving the stream handler directly:
what the handler uses of it, and a way to end the RPC on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RpcContext:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        """The RPC is over, as grpc.aio ends it: the done-callbacks run."""
        for callback in self.callbacks:
            callback(self)
