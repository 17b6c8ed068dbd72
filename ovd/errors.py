"""One exception type for every user-facing failure.

The CLI catches :class:`OvdError` and prints its message on one line, so messages must name the
file / field at fault and what was expected. Code deep inside torch never sees bad input: it is
checked at the boundary (loaders, config, CLI) and turned into an ``OvdError`` there.
"""


class OvdError(Exception):
    """A clear, single-line error about the user's input or environment."""
