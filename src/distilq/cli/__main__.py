"""`python -m distilq.cli`: the `distilq` command."""

import sys

from distilq.cli.main import main

sys.exit(main())
