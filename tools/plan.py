#!/usr/bin/env python
"""Memory per GPU and node, the teacher's placement and the step-time floor of a run: okd_scale.plan's
command line, kept here for one release (`python -m okd_scale.plan --help`, or `okd plan`)."""
import sys

from okd_scale.plan import main

if __name__ == "__main__":
    sys.exit(main())
