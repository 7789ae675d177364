"""The exception types vbshare raises for bad input and for files it cannot write.

Every message is a single line that names the problem and says what to change, so a command-line
entry point can print it without a traceback.
"""
from __future__ import annotations


class VBShareError(ValueError):
    """Bad input to vbshare: a wrong module name, an unknown method, a shape mismatch, a corrupt file."""


class WriteError(VBShareError, OSError):
    """A file could not be written (disk full, permission denied, read-only filesystem): one line naming the path
    and the fix. It is also the OSError it came from: `errno`, `strerror` and `filename` are that error's."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None,
                 filename: str | None = None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __str__(self) -> str:
        return self.args[0]
