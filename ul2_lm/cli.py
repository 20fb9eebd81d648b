"""Command-line entry points: a user's mistake is one line on stderr and a non-zero exit (2 for
bad input, 130 for Ctrl-C); tracebacks are for bugs.

    if __name__ == "__main__":
        define_flags()
        cli.run(main, "ul2_lm.train", user_errors=(ConfigError,))
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags

BAD_INPUT, INTERRUPTED = 2, 130


def fail(prog: str, message: str, code: int = BAD_INPUT) -> NoReturn:
    """Prints '<prog>: <message>' (its first line) to stderr and exits with `code`."""
    lines = str(message).strip().splitlines()
    print(f"{prog}: {lines[0] if lines else 'error'}", file=sys.stderr)
    sys.exit(code)


def override_message(argv: Sequence[str], error: BaseException) -> str:
    """What an override of a key the config does not have says: the flag and the key."""
    key = str(error).strip("'\" ")
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if "." in name and key in name.split(".")[1:]:
            path = name.split(".")
            parent = ".".join(path[:path.index(key, 1)])
            return f"{arg}: {parent} has no key {key!r}"
    return f"no config key {key!r}"


def parse_flags(prog: str) -> Callable[[list[str]], list[str]]:
    """A flags parser for app.run whose errors are one line naming the flag."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, str(e))
        except (AttributeError, KeyError) as e:  # an override of a key the config lacks
            fail(prog, override_message(argv, e))

    return parse


def run(main: Callable[[list[str]], object], prog: str,
        user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """app.run(main) with one-line messages for bad flags, `user_errors` and Ctrl-C."""
    def wrapped(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            fail(prog, "interrupted", INTERRUPTED)
        except user_errors as e:
            fail(prog, str(e))

    app.run(wrapped, flags_parser=parse_flags(prog))
