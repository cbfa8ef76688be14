"""The `strata` entry point: for `run`, start the supervisor before anything else
(runner.spawn says why), then the CLI."""
from __future__ import annotations

import os
import sys

from .spawn import spawn_blank_supervisor, wants_early_supervisor


def main() -> int:
    argv = sys.argv[1:]
    early = None
    if wants_early_supervisor(argv) and os.environ.get("STRATA_PREFORK") != "1":
        early = spawn_blank_supervisor()
    from .cli import main as cli_main  # after the spawn: argparse and the store load meanwhile
    return cli_main(argv, early_supervisor=early)
