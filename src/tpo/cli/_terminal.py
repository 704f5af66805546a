"""Text for a terminal: control characters from models, servers and datasets are shown, never obeyed.

A model's answer, a server's error body or a dataset's prompt id can carry escape sequences
(``ESC]0;title BEL`` retitles the window, ``CSI 2J`` clears the screen, ``\\r`` overwrites a
line) that a terminal would act on. Everything the commands print from such sources goes
through ``for_terminal``; files (the output JSONL, ``--json``, an answer redirected to a
file) keep the text exactly.
"""

from __future__ import annotations

import re

__all__ = ["for_terminal"]

#: C0 controls but newline and tab, DEL, and the C1 controls (U+0080-U+009F; U+009B is a one-character CSI).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def for_terminal(text: str) -> str:
    """``text`` with every control character but newline and tab written out visibly (``\\x1b``, ``\\r``).

    A Windows line ending (``\\r\\n``) is shown as a plain line break.
    """
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_visible, text.replace("\r\n", "\n"))


def _visible(m: re.Match[str]) -> str:
    char = m.group()
    return "\\r" if char == "\r" else f"\\x{ord(char):02x}"
