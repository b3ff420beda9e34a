"""`python -m easysft ...` (also what launchers such as `deepspeed --module easysft` run)."""

import sys

from easysft.cli import main

sys.exit(main())
