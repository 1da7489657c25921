"""Thin wrapper: ``python validation/bench_step.py [args]`` is ``backmatch bench [args]``
(backmatch_exact/research/bench.py).

    PYTHONPATH=. python validation/bench_step.py --model lenet --batch-size 128 --threads 2 \
        --out validation/results/bench_cpu_lenet.json
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from backmatch_exact.research.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
