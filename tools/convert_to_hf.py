#!/usr/bin/env python
"""A run's checkpoint -> a Hugging Face model directory: okd_scale.convert's command line, kept here for one release
(`python -m okd_scale.convert --help`, or `okd convert`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from okd_scale.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
