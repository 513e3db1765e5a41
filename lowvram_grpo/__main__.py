"""`python -m lowvram_grpo ...` is the same as `lowvram-grpo ...` (and what `accelerate launch -m` runs)."""

import sys

from lowvram_grpo.cli import main

sys.exit(main())
