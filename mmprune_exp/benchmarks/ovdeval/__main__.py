"""``python -m mmprune_exp.benchmarks.ovdeval score ...``: see :func:`mmprune_exp.benchmarks.ovdeval.main`."""

import sys

from mmprune_exp.benchmarks.ovdeval import main

sys.exit(main())
