import sys

from dsvc.compiler.cli import main

sys.exit(main())
