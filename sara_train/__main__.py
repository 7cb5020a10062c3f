"""``python -m sara_train`` = the ``sara-train`` command."""

import sys

from .cli import main

sys.exit(main())
