"""Developer entry point, kept for muscle memory: the same as `python -m fastattn bench`.

    python benchmarks/run.py [-k EXPR] [--out JSON] [--plot PNG] [--tiny] [--log LOG]
    python benchmarks/run.py --report JSON [--plot PNG] [--readme]

The suites themselves live in fastattn/benchmarks/ (shipped in the wheel, so the command
also works without a source checkout); see benchmarks/README.md. Run from inside this
checkout, results go to benchmarks/results/<device>-<date>.json unless --out says otherwise.
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastattn.__main__ import main

    main(["bench", *sys.argv[1:]])
