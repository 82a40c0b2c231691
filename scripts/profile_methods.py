#!/usr/bin/env python
"""Per-op profiles (torch.profiler) of one forward per method on the bench model: where the time goes.

    python scripts/profile_methods.py --model albef-base --image-size 384 --batch-size 4 --threads 1 \
        --method none --method trips --method elip --method elip --option lookahead=false --method evit --method tome

Prints, per method, the FLOPs-ideal speed-up, a category table (ms per forward, share, and the excess over the
FLOPs-ideal time) and the top ops by self time. Same as ``vlprune bench --profile`` (this script calls it).
"""

import sys

from vlprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--profile"] + sys.argv[1:]))
