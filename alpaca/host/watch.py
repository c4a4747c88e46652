"""Watch secrets.txt with inotify (the standard library has no inotify; libc does).

Editors rarely modify a file in place: vim writes a new file and renames it
over the old one, sed -i does the same, others delete and recreate. So we
watch the directory, not the file, and react to any event that names it
(IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_MOVED_FROM). The
daemon debounces: it reloads once the events have been quiet for a moment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")
WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_MODIFY

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class FileWatch:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        directory = str(self.path.parent.resolve()).encode()
        if _libc.inotify_add_watch(self.fd, directory, WATCH_MASK) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"cannot watch {self.path.parent}: {os.strerror(err)}")

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> bool:
        """Read pending events; True when one of them concerns our file."""
        name = self.path.name.encode()
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                if data[offset:offset + length].rstrip(b"\0") == name:
                    hit = True
                offset += length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
