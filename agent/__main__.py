"""``python -m agent`` runs the ``edge-agent`` command line."""

import sys

from agent.cli import main

sys.exit(main())
