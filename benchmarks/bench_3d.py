"""The 3-D benchmark from a source tree: `python benchmarks/bench_3d.py --help`.

The code lives in :mod:`deformconv.bench.video`, which `deformconv bench --3d` runs too.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deformconv.bench.video import main

if __name__ == "__main__":
    raise SystemExit(main())
