"""``python -m stlib.train`` / ``torchrun -m stlib.train --profile paper --run st``."""

import sys

from stlib.train.cli import cli_main

sys.exit(cli_main(sys.argv[1:]))
