"""`python -m gateway ...` is the same as `heartbeat-gateway ...`."""

import sys

from .cli import main

sys.exit(main())
