"""``python -m rasfx``: the ``rasfx`` command."""

import sys

from .cli import main

sys.exit(main())
