"""``python -m engine_server ...``: the same as the ``engine-server`` command."""
import sys

from engine_server.cli import main

sys.exit(main())
