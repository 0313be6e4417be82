"""``python -m tuneforge``: the ``tuneforge`` command, also as ``torchrun ... -m tuneforge train CONFIG``."""

import sys

from .commands.main import main

if __name__ == "__main__":  # importing the module (tools, the layering test) must not run the command
    sys.exit(main())
