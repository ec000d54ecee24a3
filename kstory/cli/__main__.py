"""``python -m kstory.cli``: the same as the ``kstory`` command."""

import sys

from kstory.cli import main

sys.exit(main())
