"""The ONNX benchmark from a source tree: `python benchmarks/bench_onnx.py --help`.

The code lives in :mod:`deformconv.bench.onnx_runtime`, which `deformconv bench --onnx` runs
too.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deformconv.bench.onnx_runtime import main

if __name__ == "__main__":
    raise SystemExit(main())
