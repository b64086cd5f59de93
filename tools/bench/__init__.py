"""Side-by-side filesystem benchmark: ext4, pyfuse3 passthroughfs, Chronicle.

Run ``tools/bench/fsbench.py --help``; see ``tools/bench/README.md``.
"""
