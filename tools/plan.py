#!/usr/bin/env python
"""Memory per GPU and node, the teacher's placement and the step-time floor of a run: okd_scale.plan's
command line (`python -m okd_scale.plan --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from okd_scale.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
