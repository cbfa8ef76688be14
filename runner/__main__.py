"""`python -m runner`: the strata command, exactly as the installed `strata` script runs it."""
import sys

from .launch import main

sys.exit(main())
