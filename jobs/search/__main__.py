"""`python -m jobs.search`: the search's command line (jobs/search/cli.py)."""

import sys

from jobs.search.cli import main

sys.exit(main())
