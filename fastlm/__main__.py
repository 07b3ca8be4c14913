"""`python -m fastlm ...` runs the `fastlm` command (what `torchrun -m fastlm train` needs)."""

import sys

from .cli import main

sys.exit(main())
