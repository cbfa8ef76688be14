"""runner.errors, the one place that turns an exception into `strata: error: <line>` and 125."""
import errno
import os

import pytest

from runner.errors import EXIT_FAILURE, UsageError, for_each, message, report
from store import NoSuchImage, StoreError


def test_expected_errors_are_one_line(capsys):
    assert report(NoSuchImage("x")) == EXIT_FAILURE
    assert report(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/no/such")) == EXIT_FAILURE
    assert report(UsageError("first\nsecond")) == EXIT_FAILURE
    assert capsys.readouterr().err.splitlines() == [
        "strata: error: No such image: x",
        "strata: error: No such file or directory: /no/such",
        "strata: error: first second"]
    assert message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device"


def test_for_each_reports_a_refusal_and_goes_on(capsys):
    done = []

    def action(item):
        if item == "bad":
            raise StoreError(f"cannot do {item}")
        done.append(item)
    assert for_each(["a", "bad", "b"], action) == EXIT_FAILURE
    assert done == ["a", "b"]
    assert capsys.readouterr().err == "strata: error: cannot do bad\n"
    assert for_each(["a"], action) == 0


def test_a_bug_is_not_taken_for_bad_input():
    """A ValueError (or any other unexpected exception) is strata's bug: it propagates."""
    def buggy(item):
        int(item)
    with pytest.raises(ValueError):
        for_each(["x"], buggy)
