"""How a strata command fails: one line, `strata: error: <why>`, and an exit status.

The failures a user can meet are the store's (StoreError and its kin,
store/errors.py), the command line's (UsageError: bad flags and values) and the
system's (an OSError: a missing file, a full disk, a denied permission). Each is
reported as one line and exit status 125, Docker's for the tool's own failures
(bad flags included: argparse's 2 is not used). Anything else is a bug in
strata and propagates with its traceback: no ValueError is taken for bad input
here; the code that checks an input raises one of these.
"""
from __future__ import annotations

import sys

from store.errors import StoreError

EXIT_FAILURE = 125
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: `strata images | head`


class UsageError(Exception):
    """Bad command-line input: argparse's complaints and the commands' own checks."""


EXPECTED = (StoreError, UsageError, OSError)


def message(error: BaseException) -> str:
    """The one line that says what failed: an OSError's reason and the file it names."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        text = str(error)
    return " ".join(text.splitlines()) or type(error).__name__


def report(error: BaseException) -> int:
    """Print `error` as strata's one line; its exit status. Only for the EXPECTED kinds."""
    return print_error(message(error))


def print_error(text: str) -> int:
    """strata's error line on stderr; the exit status that goes with it."""
    print(f"strata: error: {text}", file=sys.stderr)
    return EXIT_FAILURE


def for_each(items, action) -> int:
    """Docker's way with several arguments: `action` on each; a refusal (StoreError,
    UsageError) is reported and the rest go on; 125 if any was refused, else 0. What
    the system fails (an OSError) ends the command."""
    status = 0
    for item in items:
        try:
            action(item)
        except (StoreError, UsageError) as e:
            status = report(e)
    return status
