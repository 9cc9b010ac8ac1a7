"""``python -m mmprune_exp.benchmarks.mathv score ...``: see :func:`mmprune_exp.benchmarks.mathv.main`."""

import sys

from mmprune_exp.benchmarks.mathv import main

sys.exit(main())
