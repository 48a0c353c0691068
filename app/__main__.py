"""`python -m expertmesh`: the same command line as the `expertmesh` script."""

import sys

from expertmesh.cli import main

sys.exit(main())
