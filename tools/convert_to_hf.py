#!/usr/bin/env python
"""A run's checkpoint -> a Hugging Face model directory: okd_scale.convert's command line, kept here for one release
(`python -m okd_scale.convert --help`, or `okd convert`)."""
import sys

from okd_scale.convert import main

if __name__ == "__main__":
    sys.exit(main())
