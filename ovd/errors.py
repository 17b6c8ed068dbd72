"""One exception type for every user-facing failure.

The CLI catches :class:`OvdError` and prints its message on one line, so messages must name the
file / field at fault and what was expected. Code deep inside torch never sees bad input: it is
checked at the boundary (loaders, config, CLI) and turned into an ``OvdError`` there.
"""

import re


class OvdError(Exception):
    """A clear, single-line error about the user's input or environment."""


_WEIGHTS_ONLY = "Weights only load failed"


def describe(exc: BaseException, limit: int = 200, lines: int = 1) -> str:
    """One line about ``exc`` for an :class:`OvdError` message: ``"ExcClass: first line"``, or just
    the class name when the message is empty (torch's ``EOFError`` on a 0-byte file has none).
    ``lines`` > 1 joins that many non-empty lines (a headline and its first detail).

    torch's refusal of a pickle with arbitrary objects (``weights_only=True``) is reworded: its own
    text advises ``weights_only=False``, which would run code from the file; ovd never does that.
    """
    name = exc.__class__.__name__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # ANSI colour codes (torch bolds some advice)
    if _WEIGHTS_ONLY in text or "Unsupported global" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"{name}: the file holds Python objects other than tensors and plain data{what}; "
            f"ovd does not load such files (loading them could run code from the file)"
        )
    parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not parts:
        return name
    line = " ".join(parts[:lines])
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{name}: {line}"


def first_line(text: object, default: str = "", limit: int = 300) -> str:
    """The first non-empty line of ``text`` (``default`` when there is none), cut at ``limit``."""
    for ln in str(text).splitlines():
        if ln.strip():
            ln = ln.strip()
            return ln if len(ln) <= limit else ln[: limit - 3] + "..."
    return default
