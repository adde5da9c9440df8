"""Fuzz tool: ``python -m plasma.server.tools.fuzz`` runs the command line."""

import sys

from . import main

sys.exit(main())
