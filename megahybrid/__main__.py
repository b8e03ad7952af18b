"""`python -m megahybrid ...` (what torchrun launches)."""
import sys

from megahybrid.cli import main

sys.exit(main())
