"""`python -m vmmalloc ...`: the vmmalloc command (vmmalloc.cli)."""
import sys

from vmmalloc.cli import main

sys.exit(main())
