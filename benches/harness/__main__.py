"""``python -m benches.harness``: see `benches.harness.cli`."""
import sys

from .cli import main

sys.exit(main())
