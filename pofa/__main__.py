"""`python -m pofa COMMAND ...`: the `pofa` command, for environments where its script is not on PATH."""

import sys

from pofa.cli import main

if __name__ == "__main__":
    sys.exit(main())
