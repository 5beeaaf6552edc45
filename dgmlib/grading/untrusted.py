"""Reading what a student handed in, without trusting it: regular files only, of a bounded size.

A submission folder is the student's: it may hold a FIFO (opening it blocks the grader forever), a
symbolic link (to the gradebook, to another student's notebook, to ``/dev/zero``), a device, a folder,
or a notebook of gigabytes. ``check_submission`` refuses such a submission before anything of it is
graded (``dgm grade`` reports it as that student's failure, and grades the rest of the class), and
every notebook the grader reads itself, submitted or autograded, is read by ``read_regular_file``:
opened with ``O_NOFOLLOW | O_NONBLOCK``, checked to be a regular file on the opened descriptor
(``fstat``, so that nothing can be swapped in between), and read up to a cap.
Source: the course's issue 26.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "UntrustedFileError", "read_regular_file", "read_notebook", "check_submission",
           "file_kind"]

MAX_FILE_BYTES = 32 * 2**20
"""Largest file of a submission, and largest notebook the grader reads (32 MiB)."""


class UntrustedFileError(ValueError):
    """A submitted or autograded file is not a regular file, or is too large."""


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"a regular file"``, ``"a FIFO"``, ``"a symbolic link"``, ..."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``, a regular file (not a link to one) of at most ``max_bytes``.

    Raises:
        UntrustedFileError: if ``path`` is a symbolic link, a FIFO, a device, a folder or a socket, or holds
            more than ``max_bytes``.
        OSError: if it cannot be opened or read (e.g. it does not exist).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UntrustedFileError(f"{path} is a symbolic link, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFileError(f"{path} is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise UntrustedFileError(f"{path} holds {info.st_size} bytes, over the limit of {max_bytes}")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise UntrustedFileError(f"{path} holds more than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_notebook(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> dict:
    """A notebook's JSON, read by ``read_regular_file``.

    Raises:
        UntrustedFileError: as ``read_regular_file``.
        OSError: if it cannot be read.
        ValueError: if it is not JSON.
    """
    return json.loads(read_regular_file(path, max_bytes))


def check_submission(folder: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, label: str | None = None) -> str:
    """Why the submission ``folder`` (``submitted/STUDENT/ASSIGNMENT``) cannot be graded, or ``""`` if it can.

    The folder and its parent must be folders (not links to one), and every entry in it a regular file
    of at most ``max_bytes``; nothing is opened, every entry is ``lstat``-ed.

    Args:
        folder: the submission's folder.
        max_bytes: the largest file allowed.
        label: how to name the folder in the reason (default: its path).
    """
    folder = Path(folder)
    label = label or str(folder)
    for path, name in ((folder.parent, str(Path(label).parent)), (folder, label)):
        try:
            mode = os.lstat(path).st_mode
        except OSError as err:
            return f"{name} cannot be read ({err.strerror}): not graded"
        if not stat.S_ISDIR(mode):
            return f"{name} is {file_kind(mode)}, not a folder: not graded"
    try:
        entries = sorted(os.listdir(folder))
    except OSError as err:
        return f"{label} cannot be listed ({err.strerror}): not graded"
    for entry in entries:
        try:
            info = os.lstat(folder / entry)
        except OSError as err:
            return f"{label}/{entry} cannot be read ({err.strerror}): not graded"
        if not stat.S_ISREG(info.st_mode):
            return f"{label}/{entry} is {file_kind(info.st_mode)}, not a regular file: not graded"
        if info.st_size > max_bytes:
            return (f"{label}/{entry} is {info.st_size / 2**20:.1f} MiB, over the limit of "
                    f"{max_bytes / 2**20:g} MiB: not graded")
    return ""
