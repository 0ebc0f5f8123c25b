"""Point-to-point messages and sums between the ranks of one host, over Unix-domain sockets.

gloo's TCP pairs hand every message through a background I/O thread to the waiting one, which
on a small CPU host busy with the ranks' compute costs many times the exchange itself; here
the waiting thread reads its socket (benchmarks/p2p_latency.py). Messages are framed (tag,
length) and matched like MPI's: by source and tag, in posting order. A send completes on the
caller's thread when the socket takes it whole, else the rest goes to the peer's sender thread,
so a send never blocks its caller (two ranks may send to each other before either receives).
"""

from __future__ import annotations

import collections
import math
import select
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

import torch

_HEADER = struct.Struct("<qq")  # tag, payload bytes
_SOCKET_BUFFER = 4 << 20
_CONNECT_TIMEOUT_S = 60.0
ALL_REDUCE_TAG = -1  # protocol tags are non-negative


class PeerLost(RuntimeError):
    """The peer's socket closed or broke (its process exited), or an earlier wait on it
    timed out mid-message, leaving the stream unusable."""


def _bytes_of(t: torch.Tensor) -> memoryview:
    if t.is_cuda:
        raise ValueError("the local transport carries host tensors (stage CUDA tensors first)")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class _Recv:
    """A posted receive: filled when its message is read (by whichever wait reads it)."""

    __slots__ = ("buf", "done", "error")

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.done = False
        self.error: BaseException | None = None


class _Channel:
    """One connected peer: its socket, its sender thread, and the receive matching state.
    One thread at a time reads the socket (`reading`); a message it reads for another
    thread's receive is handed over through `cond`."""

    def __init__(self, peer: int, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.send_lock = threading.Lock()
        self.sender: ThreadPoolExecutor | None = None
        self.last_send: Future | None = None
        self.cond = threading.Condition()
        self.reading = False
        self.posted: dict[int, collections.deque[_Recv]] = collections.defaultdict(collections.deque)
        self.unclaimed: dict[int, collections.deque[bytes]] = collections.defaultdict(collections.deque)
        self.broken: str | None = None

    # sending ----------------------------------------------------------------------------
    def send(self, t: torch.Tensor, tag: int) -> LocalWork:
        payload = _bytes_of(t)
        frame = [memoryview(_HEADER.pack(tag, payload.nbytes)), payload]
        with self.send_lock:
            self._check()
            if self.last_send is None or self.last_send.done():
                frame = self._send_some(frame)
                if not frame:
                    return LocalWork(self, None)
            if self.sender is None:
                self.sender = ThreadPoolExecutor(1, thread_name_prefix=f"fapool-send-{self.peer}")
            # The rest goes out on the sender thread, in order after any earlier rest; the
            # memoryview keeps the tensor alive until then (gloo's isend asks the same).
            self.last_send = self.sender.submit(self._send_all, frame)
            return LocalWork(self, self.last_send)

    def _send_some(self, frame: list[memoryview]) -> list[memoryview]:
        """Send what the socket takes now without blocking; return what is left."""
        try:
            sent = self.sock.sendmsg(frame, [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise self._lose(f"send failed: {e}") from None
        return _advance(frame, sent)

    def _send_all(self, frame: list[memoryview]) -> None:
        try:
            for part in frame:
                self.sock.sendall(part)
        except OSError as e:
            raise self._lose(f"send failed: {e}") from None

    # receiving --------------------------------------------------------------------------
    def post(self, buf: torch.Tensor, tag: int) -> LocalWork:
        if not buf.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        r = _Recv(buf)
        with self.cond:
            queued = self.unclaimed.get(tag)
            if queued:
                _fill(r, queued.popleft())
            else:
                self.posted[tag].append(r)
        return LocalWork(self, None, r)

    def wait_recv(self, r: _Recv, deadline: float) -> None:
        while True:
            with self.cond:
                while not r.done and self.reading:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.cond.wait(None if math.isinf(left) else left)
                if r.done:
                    break
                self._check()
                self.reading = True
            try:
                self._read_one(deadline)
            finally:
                with self.cond:
                    self.reading = False
                    self.cond.notify_all()
        if r.error is not None:
            raise r.error

    def _read_one(self, deadline: float) -> None:
        """Read the next message into the oldest receive posted for its tag (or keep it)."""
        header = bytearray(_HEADER.size)
        self._read_into(memoryview(header), deadline, header=True)
        tag, nbytes = _HEADER.unpack(header)
        with self.cond:
            waiting = self.posted.get(tag)
            r = waiting.popleft() if waiting else None
        if r is not None and _bytes_of(r.buf).nbytes == nbytes:
            self._read_into(_bytes_of(r.buf), deadline)
            with self.cond:
                r.done = True
            return
        data = bytearray(nbytes)
        self._read_into(memoryview(data), deadline)
        with self.cond:
            if r is not None:
                _fill(r, bytes(data))
            else:
                self.unclaimed[tag].append(bytes(data))

    def _read_into(self, view: memoryview, deadline: float, header: bool = False) -> None:
        got = 0
        while got < view.nbytes:
            left = deadline - time.monotonic()
            if not math.isinf(left) and not self.poller.poll(max(0.0, left) * 1e3):
                if got or not header:  # the stream stops mid-message: nothing after it can be read
                    self.broken = "an earlier wait on it timed out mid-message"
                raise TimeoutError
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as e:
                raise self._lose(f"receive failed: {e}") from None
            if n == 0:
                raise self._lose("connection closed (the process exited?)")
            got += n

    def _lose(self, why: str) -> PeerLost:
        self.broken = why
        return PeerLost(why)

    def _check(self) -> None:
        if self.broken is not None:
            raise PeerLost(self.broken)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.shutdown(wait=False, cancel_futures=True)
        self.sock.close()


def _advance(frame: list[memoryview], sent: int) -> list[memoryview]:
    while frame and sent >= frame[0].nbytes:
        sent -= frame[0].nbytes
        frame = frame[1:]
    if frame and sent:
        frame = [frame[0][sent:], *frame[1:]]
    return frame


def _fill(r: _Recv, data: bytes) -> None:
    view = _bytes_of(r.buf)
    if view.nbytes != len(data):
        r.error = PeerLost(f"message of {len(data)} bytes for a {view.nbytes}-byte receive buffer")
    else:
        view[:] = data
    r.done = True


class LocalWork:
    """A posted send or receive; `wait(timeout_s)` raises TimeoutError or PeerLost."""

    __slots__ = ("_channel", "_future", "_recv")

    def __init__(self, channel: _Channel, future: Future | None, recv: _Recv | None = None) -> None:
        self._channel = channel
        self._future = future
        self._recv = recv

    def wait(self, timeout_s: float = math.inf) -> bool:
        deadline = time.monotonic() + timeout_s
        if self._recv is not None:
            self._channel.wait_recv(self._recv, deadline)
        elif self._future is not None:
            try:
                self._future.result(timeout=None if math.isinf(timeout_s) else timeout_s)
            except FuturesTimeout:
                raise TimeoutError from None
        return True


class _AllReduce:
    """The sum of one tensor over a group: every member sends its tensor to every other and
    adds all of them in rank order, so each member holds the same bits."""

    def __init__(self, transport: LocalTransport, t: torch.Tensor, ranks: list[int]) -> None:
        if not t.is_contiguous():
            raise ValueError("all-reduce needs a contiguous tensor")
        self.t, self.ranks, self.me, self.transport = t, ranks, transport.rank, transport
        self.parts = {r: transport.take_buffer(t) for r in ranks if r != self.me}
        self.recvs = [transport.recv(buf, r, ALL_REDUCE_TAG) for r, buf in self.parts.items()]
        self.sends = [transport.send(t, r, ALL_REDUCE_TAG) for r in self.parts]
        self.parts[self.me] = t  # overwritten only once every send of it has completed

    def wait(self, timeout_s: float = math.inf) -> bool:
        deadline = time.monotonic() + timeout_s
        for w in self.recvs + self.sends:
            w.wait(max(0.0, deadline - time.monotonic()))
        first, second, *rest = (self.parts[r] for r in self.ranks)
        if not rest:  # own tensor is one of the two summands: add in place
            torch.add(first, second, out=self.t)
        else:
            total = first + second
            for part in rest:
                total += part
            self.t.copy_(total)
        self.transport.give_back([b for r, b in self.parts.items() if r != self.me])
        return True


LOCAL_WORK = (LocalWork, _AllReduce)  # the requests this transport returns


class LocalTransport:
    """Every pair of one host's ranks connected by a Unix-domain socket (abstract names,
    unique to `world_name`): each rank connects to those below it and accepts those above."""

    def __init__(self, rank: int, world_size: int, world_name: str) -> None:
        self.rank = rank
        self.channels: dict[int, _Channel] = {}
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(_address(world_name, rank))
            listener.listen(max(1, world_size))
            for peer in range(rank):
                self._add(peer, _connect(_address(world_name, peer), rank))
            listener.settimeout(_CONNECT_TIMEOUT_S)
            for _ in range(rank + 1, world_size):
                sock, _ = listener.accept()
                sock.settimeout(_CONNECT_TIMEOUT_S)
                (peer,) = struct.unpack("<q", _recv_exact(sock, 8))
                self._add(peer, sock)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def take_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A receive buffer shaped like `like`, reused across sums: a fresh megabyte-sized
        one costs its page faults on every call."""
        free = self._buffers.get((like.shape, like.dtype))
        return free.pop() if free else torch.empty(like.shape, dtype=like.dtype)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        for b in buffers:
            free = self._buffers.setdefault((b.shape, b.dtype), [])
            if len(free) < 8:
                free.append(b)

    def _add(self, peer: int, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        sock.settimeout(None)
        self.channels[peer] = _Channel(peer, sock)

    def send(self, t: torch.Tensor, dst: int, tag: int) -> LocalWork:
        return self.channels[dst].send(t, tag)

    def recv(self, buf: torch.Tensor, src: int, tag: int) -> LocalWork:
        return self.channels[src].post(buf, tag)

    def all_reduce(self, t: torch.Tensor, ranks: list[int]) -> _AllReduce:
        return _AllReduce(self, t, sorted(ranks))

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()


def _address(world_name: str, rank: int) -> str:
    return f"\0fapool-{world_name}-{rank}"  # Linux abstract namespace: no file to clean up


def _connect(address: str, rank: int) -> socket.socket:
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            sock.sendall(struct.pack("<q", rank))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise PeerLost("connection closed during the handshake")
        data += chunk
    return data
