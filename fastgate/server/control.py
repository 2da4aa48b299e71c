"""The control channel between the supervisor and a worker: a socketpair carrying
length-prefixed JSON messages (`{"op": ..., ...}`) in both directions."""

from __future__ import annotations

import asyncio
import struct

import msgspec

_LENGTH = struct.Struct("!I")
# A config of 10,000 routes is a few MiB of YAML; 256 MiB bounds a runaway peer.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ControlChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock) -> "ControlChannel":
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_MESSAGE_BYTES)
        return cls(reader, writer)

    def send(self, message: dict) -> None:
        payload = msgspec.json.encode(message)
        self._writer.write(_LENGTH.pack(len(payload)) + payload)

    async def receive(self) -> dict | None:
        """The next message, or None when the peer has gone."""
        try:
            header = await self._reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            if length > MAX_MESSAGE_BYTES:
                return None
            return msgspec.json.decode(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self._writer.close()
