"""`python -m vbshare.report`: see vbshare.report.cli."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
