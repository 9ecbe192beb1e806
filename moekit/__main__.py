"""`python -m moekit ...` = `moekit ...`; what `torchrun --nproc-per-node N -m moekit train ...` runs on each rank."""

import sys

from moekit.cli import main

sys.exit(main())
