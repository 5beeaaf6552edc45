"""Output limits for the grading kernel (see ``dgmlib.grading.sandbox``)."""

from __future__ import annotations

import os

from ipykernel.iostream import OutStream


class LimitedOutStream(OutStream):
    """ipykernel's stdout/stderr stream that drops everything past ``DGM_SANDBOX_OUTPUT_KB`` per stream.

    A flood of prints then costs the grader a bounded amount of memory and time; one notice says
    where the output was cut.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._budget = int(os.environ.get("DGM_SANDBOX_OUTPUT_KB", "512")) * 1024
        self._truncated = False

    def write(self, string: str) -> int:  # noqa: D102 - the stream protocol
        if self._budget <= 0:
            if not self._truncated:
                self._truncated = True
                super().write("\n[output truncated by the grader: limit reached]\n")
            return len(string)
        piece = string[: self._budget]
        self._budget -= len(piece)
        super().write(piece)
        return len(string)
