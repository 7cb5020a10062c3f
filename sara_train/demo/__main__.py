"""``python -m sara_train.demo``: see ``sara_train.demo.run``."""

import sys

from .run import main

sys.exit(main())
