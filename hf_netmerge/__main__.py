"""``python -m hf_netmerge`` is the ``hf-netmerge`` command."""

import sys

from .cli import main

sys.exit(main())
