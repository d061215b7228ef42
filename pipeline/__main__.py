"""``python -m pipeline`` is the ``roicodec`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
