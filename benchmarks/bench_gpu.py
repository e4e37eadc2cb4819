"""The GPU benchmark from a source tree: `python benchmarks/bench_gpu.py --help`.

The code lives in :mod:`deformconv.bench.gpu`, which `deformconv bench --gpu` runs too.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deformconv.bench.gpu import main

if __name__ == "__main__":
    raise SystemExit(main())
