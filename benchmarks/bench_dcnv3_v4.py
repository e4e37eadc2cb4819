"""The DCNv3 / DCNv4 benchmark from a source tree: `python benchmarks/bench_dcnv3_v4.py --help`.

The code lives in :mod:`deformconv.bench.dcnv3`, which `deformconv bench --dcnv3` runs too.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deformconv.bench.dcnv3 import main

if __name__ == "__main__":
    raise SystemExit(main())
