"""The CPU benchmark from a source tree: `python benchmarks/bench_cpu.py --help`.

The code lives in :mod:`deformconv.bench.cpu`, which `deformconv bench --cpu` runs too.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deformconv.bench.cpu import main

if __name__ == "__main__":
    raise SystemExit(main())
