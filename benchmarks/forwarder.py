"""Reference point: the cheapest possible Python proxy, a byte forwarder on uvloop.

    .venv/bin/python benchmarks/forwarder.py LISTEN_PORT UPSTREAM_PORT

Copies bytes both ways with asyncio protocol callbacks (no streams, no
coroutine per chunk), parses nothing and enforces nothing.  ``cpu_cost.py``
runs it next to PgBouncer and tenantgate so the CPU tenantgate spends per
transaction can be split into "what any Python forwarder pays" (event loop,
send/recv syscalls) and "what tenantgate's checks add".
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

import uvloop

HOST = "127.0.0.1"


class _Pipe(asyncio.Protocol):
    def __init__(self) -> None:
        self.peer: _Pipe | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def client_side() -> _Pipe:
        client = _Pipe()

        async def connect() -> None:
            upstream = _Pipe()
            try:
                await loop.create_connection(lambda: upstream, HOST, upstream_port)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            upstream.peer, client.peer = client, upstream
            for chunk in client.pending:
                assert upstream.transport is not None
                upstream.transport.write(chunk)
            client.pending.clear()

        tasks.add(task := loop.create_task(connect()))
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(client_side, HOST, listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
