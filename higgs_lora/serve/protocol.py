"""uvicorn's h11 HTTP protocol with a deadline on the request head: a connection that has not sent a complete
request line and headers within `header_seconds` of connecting (or of the end of its previous request) is closed.
uvicorn itself only times out idle keep-alive connections, so a client trickling a partial head held a connection
(and its buffers) for ever.

Imported by `serve.app` when it starts uvicorn; see docs/inference.md#server.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_seconds: float) -> type[H11Protocol]:
    """An H11Protocol subclass closing connections whose request head is not complete within `header_seconds`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request head
                self._arm_head_deadline()
            else:
                self._cancel_head_deadline()

        def connection_lost(self, exc) -> None:
            self._cancel_head_deadline()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_deadline is None:
                self._head_deadline = self.loop.call_later(header_seconds, self._head_too_slow)

        def _cancel_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            idle = self.cycle is None or self.cycle.response_complete
            if self.conn.their_state is h11.IDLE and idle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
