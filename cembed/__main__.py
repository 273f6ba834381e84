"""`python -m cembed`: the command line lives in cembed.apps.cli."""
import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
