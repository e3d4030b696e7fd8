"""``python -m workers.torchrun`` (and ``torchrun ... -m workers.torchrun``): the command users type.

The code is ``workers/pretrain/torchrun.py``; this module only keeps the command where the README
and existing job scripts have it.
"""
import sys

from workers.pretrain.torchrun import main

if __name__ == "__main__":
    sys.exit(main())
