"""A real terminal for display tests: a process on a pseudo-terminal, read by pyte."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import pyte


class Terminal:
    """A process running on a pseudo-terminal of ``cols`` x ``rows``, read by pyte."""

    def __init__(
        self, argv: list[str], env: dict[str, str], cols: int = 100, rows: int = 50
    ) -> None:
        self.master, slave = os.openpty()
        #: The slave side's path: reopened to read its settings (``tty_attrs``).
        self.slave_name = os.ttyname(slave)
        self._set_size(slave, cols, rows)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @staticmethod
    def _set_size(fd: int, cols: int, rows: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the child side is closed
                break
            if not data:
                break
            with self.lock:
                self.raw.extend(data)
                self.stream.feed(data)

    def text(self) -> str:
        with self.lock:
            return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, predicate: Callable[[str], Any] | str, timeout: float = 10.0) -> str:
        check = (lambda t: predicate in t) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if check(text):
                return text
            if self.proc.poll() is not None:
                self.reader.join(1)
                text = self.text()
                if check(text):
                    return text
                break
            time.sleep(0.02)
        raise AssertionError(f"screen never matched {predicate!r}; it shows:\n{self.text()}")

    def tty_attrs(self) -> list[Any]:
        """The terminal's settings now (``termios.tcgetattr`` of the slave side)."""
        fd = os.open(self.slave_name, os.O_RDWR | os.O_NOCTTY)
        try:
            return termios.tcgetattr(fd)
        finally:
            os.close(fd)

    def pending_input(self) -> int:
        """Bytes typed on the terminal that nobody has read (FIONREAD of the slave)."""
        fd = os.open(self.slave_name, os.O_RDWR | os.O_NOCTTY)
        try:
            raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
            return int(struct.unpack("i", raw)[0])
        finally:
            os.close(fd)

    def press(self, keys: str | bytes) -> None:
        """Type ``keys`` on the terminal."""
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def resize(self, cols: int, rows: int) -> None:
        self._set_size(self.master, cols, rows)
        with self.lock:
            self.screen.resize(rows, cols)
        self.proc.send_signal(signal.SIGWINCH)

    def wait(self, timeout: float = 15.0) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(2)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(2)
        with contextlib.suppress(OSError):
            os.close(self.master)
