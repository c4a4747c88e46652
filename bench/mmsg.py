"""recvmmsg(2) through ctypes, for bench/udp_micro.py (measured, not adopted: docs/design.md).

Python's socket module has recvmsg but no recvmmsg. MmsgReceiver reads up
to `vlen` datagrams per call into buffers set up once (anonymous mappings:
only the pages datagrams fill are touched) and hands back exactly what
recvmsg would have, (data, ancillary data, flags, address) per datagram;
MmsgSocket serves a socket's recvmsg from such batches, so alpaca's own
Udp.recv_batch runs unchanged on top of it. MmsgReceiver raises OSError
where the C library has no recvmmsg. It was in alpaca/host/ for one commit,
with tests that it reads exactly what recvmsg does (content, order,
senders, pktinfo, GRO trains, IPv4 and IPv6): git log -- alpaca/host/mmsg.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import socket
import struct
from collections import deque

MSG_DONTWAIT = 0x40
SOCKADDR_SIZE = 28                  # struct sockaddr_in6, the larger of the two families'
ADDRESS_CACHE = 4096                # raw source addresses kept decoded (bounded: a flood churns it)
_CMSGHDR = struct.Struct("@Nii")    # struct cmsghdr: len, level, type
_ALIGN = ctypes.sizeof(ctypes.c_size_t)
_V6_NAME = struct.Struct("!HI16s")  # sin6_port, sin6_flowinfo, sin6_addr (after sin6_family)
_SCOPE = struct.Struct("@I")        # sin6_scope_id


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


# where the kernel's answers sit in the array, read through memoryviews (no ctypes object per datagram)
_STRIDE = ctypes.sizeof(_Mmsghdr)
_LEN_AT = _Mmsghdr.len.offset
_NAMELEN_AT = _Mmsghdr.hdr.offset + _Msghdr.namelen.offset
_CONTROLLEN_AT = _Mmsghdr.hdr.offset + _Msghdr.controllen.offset
_FLAGS_AT = _Mmsghdr.hdr.offset + _Msghdr.flags.offset
assert _STRIDE % _ALIGN == 0 and _LEN_AT % 4 == 0 and _CONTROLLEN_AT % _ALIGN == 0


def libc_recvmmsg():
    """libc's recvmmsg; OSError where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.recvmmsg
    except (OSError, AttributeError) as e:
        raise OSError(f"no recvmmsg in the C library: {e}") from None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


class MmsgReceiver:
    """Reads up to `vlen` datagrams of at most `size` bytes per call from `sock`."""

    def __init__(self, sock: socket.socket, size: int, control_size: int, vlen: int = 64):
        self._call = libc_recvmmsg()
        self.fd, self.vlen, self.size, self.control_size = sock.fileno(), vlen, size, control_size
        self.v6 = sock.family == socket.AF_INET6
        # anonymous mappings: pages are touched only as far as datagrams fill them
        self._data = mmap.mmap(-1, vlen * size)
        self._names = mmap.mmap(-1, vlen * SOCKADDR_SIZE)
        self._control = mmap.mmap(-1, vlen * control_size)
        self._iovs = (_Iovec * vlen)()
        self._msgs = (_Mmsghdr * vlen)()
        base, names, control = (ctypes.addressof(ctypes.c_char.from_buffer(m))
                                for m in (self._data, self._names, self._control))
        for i in range(vlen):
            self._iovs[i].base, self._iovs[i].len = base + i * size, size
            hdr = self._msgs[i].hdr
            hdr.name, hdr.namelen = names + i * SOCKADDR_SIZE, SOCKADDR_SIZE
            hdr.iov, hdr.iovlen = ctypes.addressof(self._iovs[i]), 1
            hdr.control, hdr.controllen = control + i * control_size, control_size
        # the kernel overwrites namelen, controllen, flags and len: one memmove restores them all
        self._template = ctypes.create_string_buffer(bytes(self._msgs), ctypes.sizeof(self._msgs))
        self._headers = memoryview(self._msgs).cast("B")
        self._words = self._headers.cast("I")           # msg_len, msg_namelen
        self._flags = self._headers.cast("i")           # msg_flags
        self._sizes = self._headers.cast("N")           # msg_controllen
        self._addresses: dict[bytes, tuple] = {}

    def close(self) -> None:
        for view in (self._words, self._flags, self._sizes, self._headers):
            view.release()
        for m in (self._data, self._names, self._control):
            m.close()

    def receive(self, n: int) -> list[tuple[bytes, list, int, tuple]]:
        """Up to n datagrams (at least 1), each as socket.recvmsg returns it; raises
        OSError as recvmsg does (BlockingIOError: nothing to read)."""
        n = max(1, min(n, self.vlen))
        ctypes.memmove(self._msgs, self._template, n * _STRIDE)
        got = self._call(self.fd, self._msgs, n, MSG_DONTWAIT, None)
        if got < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        words, sizes, data, size = self._words, self._sizes, self._data, self.size
        out = []
        for i in range(got):
            word, start = i * _STRIDE // 4, i * size
            out.append((data[start:start + words[word + _LEN_AT // 4]],
                        self._ancillary(i, sizes[i * _STRIDE // _ALIGN + _CONTROLLEN_AT // _ALIGN]),
                        self._flags[word + _FLAGS_AT // 4],
                        self._address(i, words[word + _NAMELEN_AT // 4])))
        return out

    def _ancillary(self, i: int, length: int) -> list[tuple[int, int, bytes]]:
        """The control messages of datagram i, as recvmsg lists them."""
        control, pos = self._control, i * self.control_size
        end, out = pos + min(length, self.control_size), []
        while pos + _CMSGHDR.size <= end:
            cmsg_len, level, kind = _CMSGHDR.unpack_from(control, pos)
            if cmsg_len < _CMSGHDR.size:
                break
            out.append((level, kind, control[pos + _CMSGHDR.size:min(pos + cmsg_len, end)]))
            pos += (cmsg_len + _ALIGN - 1) & ~(_ALIGN - 1)
        return out

    def _address(self, i: int, length: int) -> tuple:
        """The sender of datagram i, as recvmsg gives it: (host, port), or
        (host, port, flowinfo, scope_id) on an IPv6 socket."""
        start = i * SOCKADDR_SIZE
        raw = self._names[start:start + min(length, SOCKADDR_SIZE)]
        addr = self._addresses.get(raw)
        if addr is None:
            if self.v6:
                port, flowinfo, host = _V6_NAME.unpack_from(raw, 2)
                addr = (socket.inet_ntop(socket.AF_INET6, host), port, flowinfo, _SCOPE.unpack_from(raw, 24)[0])
            else:
                addr = (socket.inet_ntoa(raw[4:8]), raw[2] << 8 | raw[3])
            if len(self._addresses) >= ADDRESS_CACHE:
                self._addresses.clear()
            self._addresses[raw] = addr
        return addr


class MmsgSocket:
    """`sock` whose recvmsg is served from recvmmsg batches; everything else is the socket's."""

    def __init__(self, sock: socket.socket, size: int, control_size: int, vlen: int = 64):
        self._sock = sock
        self._reader = MmsgReceiver(sock, size, control_size, vlen)
        self._queue: deque = deque()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    def recvmsg(self, _size: int, _control_size: int) -> tuple[bytes, list, int, tuple]:
        if not self._queue:
            self._queue.extend(self._reader.receive(self._reader.vlen))    # BlockingIOError: empty
        return self._queue.popleft()

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
