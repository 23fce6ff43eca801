"""Messages between the gateway's supervisor and one worker: length-prefixed orjson over a socketpair.

A frame is a 4-byte big-endian length and one orjson object with an `op`. A message that carries an `id`
is a question: the other side answers with a message whose `re` is that id. Both sides read with asyncio;
each question is handled in its own task, so a worker can answer the supervisor's question ("your state")
while it waits for the answer to its own ("everyone's state").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

import orjson

log = logging.getLogger(__name__)

LENGTH = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a sanity bound: the largest message is a metrics snapshot, far smaller

Handler = Callable[[dict], Awaitable[dict | None]]


class ChannelClosed(ConnectionError):
    pass


async def read_message(reader: asyncio.StreamReader) -> dict:
    """The next message; ChannelClosed at the end of the stream."""
    try:
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        if length > MAX_FRAME:
            raise ChannelClosed(f"frame of {length} bytes")
        return orjson.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc)) from None


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket, handler: Handler) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, handler)

    def send(self, message: dict) -> None:
        if self.closed:
            return
        data = orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS)  # e.g. counts by HTTP status
        self.writer.write(LENGTH.pack(len(data)) + data)

    async def ask(self, message: dict, timeout_s: float) -> dict:
        """Send a question and wait for its answer; ChannelClosed or TimeoutError when none comes."""
        if self.closed:
            raise ChannelClosed("channel closed")
        ask_id = next(self.ids)
        answer: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self.waiting[ask_id] = answer
        try:
            self.send({**message, "id": ask_id})
            return await asyncio.wait_for(answer, timeout_s)
        finally:
            self.waiting.pop(ask_id, None)

    async def serve(self) -> None:
        """Read and dispatch messages until the other side closes (then return)."""
        try:
            while True:
                message = await read_message(self.reader)
                if "re" in message:  # an answer: to a question still waiting, or a late one (dropped)
                    answered = self.waiting.get(message["re"])
                    if answered is not None and not answered.done():
                        answered.set_result(message)
                    continue
                task = asyncio.get_running_loop().create_task(self._handle(message))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except ChannelClosed:
            pass
        finally:
            self.close()

    async def _handle(self, message: dict) -> None:
        try:
            answer = await self.handler(message)
        except Exception:
            log.exception("handling %s failed", message.get("op"))
            answer = {"error": "failed; see the log"}
        if "id" in message:
            self.send({**(answer or {}), "re": message["id"]})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for answer in self.waiting.values():
            if not answer.done():
                answer.set_exception(ChannelClosed("channel closed"))
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            self.writer.close()
