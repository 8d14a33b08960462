"""`python -m stamerge ...`: the `stamerge` command."""

import sys

from ._cli import main

sys.exit(main())
