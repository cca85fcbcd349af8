"""`python -m dsvc ...`: the same command line as `dsvc ...`."""

import sys

from dsvc.compiler.cli import main

sys.exit(main())
