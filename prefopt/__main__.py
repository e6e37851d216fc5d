"""`python -m prefopt ...` == the `prefopt` command (see prefopt/cli.py)."""
import sys

from prefopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
