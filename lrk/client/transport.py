"""Datagram sockets to relay nodes: the only place the client touches the network.

UDP sockets are connected to the node, so the kernel drops datagrams from any
other source (the relay replies from the address it was sent to). A `unix:`
node is a UNIX *datagram* socket: the client binds its own socket in a private
temporary directory (a reply needs an address to go to), reachable by the
relay's user whatever it is, and removes it on close; requests go out with
sendto() so a restarted relay is reached again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
import weakref
from typing import Any, Dict, Optional

from lrk.client.nodes import NodeAddress
from lrk.client.protocol import MAX_REPLY_BYTES, decode_reply

_BUFFER = MAX_REPLY_BYTES + 1


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class _SocketHolder:
    """A socket to one node plus the temporary directory of its unix path, if any."""

    def __init__(self, address: NodeAddress) -> None:
        self.address = address
        self.peer: Optional[str] = None  # sendto() target for unix, None when connected
        self.local_path: Optional[str] = None
        self._finalizer: Optional[weakref.finalize] = None
        if address.scheme == "unix":
            self.sock = self._open_unix(address)
        else:
            self.sock = self._open_udp(address)

    def _open_udp(self, address: NodeAddress) -> socket.socket:
        family = socket.AF_INET6 if address.scheme == "udp6" else socket.AF_INET
        infos = socket.getaddrinfo(address.host, address.port, family, socket.SOCK_DGRAM)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect(infos[0][4])
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_unix(self, address: NodeAddress) -> socket.socket:
        directory = tempfile.mkdtemp(prefix="lrk-client-")
        self._finalizer = weakref.finalize(self, _remove_dir, directory)
        self.local_path = os.path.join(directory, "client.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.local_path)
            # the relay may run as another user: it must reach the path to answer.
            # Others can traverse but not list the directory; a forged reply would
            # still need the request's random cookie.
            os.chmod(directory, 0o711)
            os.chmod(self.local_path, 0o666)
        except BaseException:
            sock.close()
            self._finalizer()
            raise
        self.peer = address.path
        return sock

    def close(self, close_socket: bool = True) -> None:
        """Close the socket and remove the unix client path (idempotent)."""
        if close_socket:
            self.sock.close()
        if self._finalizer is not None:
            self._finalizer()


class SyncTransport:
    """Blocking datagram transport to one node, for LrkClient."""

    def __init__(self, address: NodeAddress) -> None:
        self._holder = _SocketHolder(address)
        self.local_path = self._holder.local_path

    def send(self, data: bytes) -> None:
        """Send one datagram; OSError means it was lost (the try then times out)."""
        holder = self._holder
        if holder.peer is None:
            holder.sock.send(data)
        else:
            holder.sock.sendto(data, holder.peer)

    def recv(self, timeout: float) -> Optional[bytes]:
        """The next datagram within `timeout` seconds, or None when none came."""
        sock = self._holder.sock
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                return sock.recv(_BUFFER)
            except socket.timeout:
                return None
            except ConnectionRefusedError:
                continue  # ICMP port unreachable for an earlier send: keep waiting

    def close(self) -> None:
        self._holder.close()


class _Endpoint(asyncio.DatagramProtocol):
    """Routes each reply datagram to the request waiting for its cookie."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.waiters: Dict[str, asyncio.Queue[bytes]] = {}
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        cookie = _peek_cookie(data)
        queue = self.waiters.get(cookie) if isinstance(cookie, str) else None
        if queue is None and cookie is None and len(self.waiters) == 1:
            queue = next(iter(self.waiters.values()))  # cookie-less error reply: only one asked
        if queue is not None:
            queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for earlier sends: the try just times out

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True


def _peek_cookie(data: bytes) -> Any:
    reply = decode_reply(data)
    if reply is None:
        return False  # not a reply map: routed nowhere
    cookie = reply.get("cookie")
    if isinstance(cookie, bytes):
        cookie = cookie.decode("utf-8", "replace")
    return cookie


class AsyncTransport:
    """Asyncio datagram transport to one node, for AsyncLrkClient; many requests at once."""

    def __init__(self, holder: _SocketHolder, transport: asyncio.DatagramTransport,
                 endpoint: _Endpoint) -> None:
        self._holder = holder
        self._transport = transport
        self._endpoint = endpoint
        self.local_path = holder.local_path

    @classmethod
    async def open(cls, address: NodeAddress) -> AsyncTransport:
        holder = _SocketHolder(address)
        try:
            holder.sock.setblocking(False)
            loop = asyncio.get_running_loop()
            transport, endpoint = await loop.create_datagram_endpoint(_Endpoint,
                                                                      sock=holder.sock)
        except BaseException:
            holder.close()
            raise
        return cls(holder, transport, endpoint)

    @property
    def usable(self) -> bool:
        return not self._endpoint.lost

    def register(self, cookie: str) -> asyncio.Queue[bytes]:
        """Start collecting the replies that carry `cookie`."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._endpoint.waiters[cookie] = queue
        return queue

    def unregister(self, cookie: str) -> None:
        self._endpoint.waiters.pop(cookie, None)

    def send(self, data: bytes) -> None:
        if self._holder.peer is None:
            self._transport.sendto(data)
        else:
            self._transport.sendto(data, self._holder.peer)

    def close(self) -> None:
        self._transport.close()  # closes the socket itself
        self._holder.close(close_socket=False)

