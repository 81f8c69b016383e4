"""One strict state-dict check for every loader: the same one-line message naming the file and the keys."""

from __future__ import annotations

from typing import Mapping

from .errors import BonsaiValueError


def few(keys, n: int = 6) -> str:
    """At most n items of a list, then how many more."""
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def check_state(source, expected: Mapping[str, tuple], given: Mapping[str, tuple], what: str = "state dict") -> None:
    """Raise BonsaiValueError unless `given` has exactly the keys of `expected`, with the same shapes.

    expected, given: key -> shape (any sequence of ints). source: the file or folder, named first in the message:
    "<source>: <what> does not match: missing [...]; unexpected [...]; wrong shapes [key: expected (..), got (..)]".
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k])}, got {tuple(given[k])}"
             for k in sorted(set(expected) & set(given)) if tuple(given[k]) != tuple(expected[k])]
    parts = [f"{name} {few(items)}" for name, items in
             (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if items]
    if parts:
        raise BonsaiValueError(f"{source}: {what} does not match: {'; '.join(parts)}")
