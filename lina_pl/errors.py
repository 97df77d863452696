"""How ``lina`` reports a user's mistake: one line naming the cause and the fix, and a non-zero exit.

A user error is an exception of :data:`USER_ERRORS` (a bad option, config, path, shard, checkpoint or npz:
the code raises ``ValueError`` / ``FileNotFoundError`` with a message that says what to do). Libraries bury
such a message: jsonargparse wraps it in a second exception that ends in a dump of the whole config, argparse
prints the full usage above it. ``lina`` prints only the message; ``LINA_DEBUG=1`` (or ``lina --debug``)
shows the traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from types import TracebackType

#: environment variable that makes ``lina`` show tracebacks of user errors (``lina --debug`` sets it)
DEBUG_ENV = "LINA_DEBUG"
#: exception types that report a user's mistake, not a bug (argparse's covers jsonargparse's too)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    ImportError,
    FloatingPointError,
    argparse.ArgumentError,
)


def one_line(err: BaseException | str) -> str:
    """An exception's message (or a text) on one line."""
    return " ".join(str(err).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: message (see prog --help)``, exit status 2.

    Why: argparse prints the whole usage above the message, which buries it.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def _raised_in_lina(err: BaseException) -> bool:
    tb: TracebackType | None = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("lina_pl.")


def _user_error_types() -> tuple[type[BaseException], ...]:
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")  # only imported if it can be raised
    return USER_ERRORS + ((lightning.MisconfigurationException,) if lightning else ())


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug.

    Wrappers (jsonargparse around a class that failed to instantiate) are skipped: the first exception of the
    ``raise … from`` chain that lina_pl code raised carries the message meant for the user.
    """
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    cause = next((e for e in chain if _raised_in_lina(e)), err)
    return one_line(cause) if isinstance(cause, _user_error_types()) else None
