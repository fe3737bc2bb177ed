"""The benchmark scripts are modules of benchmarks/, not of the package. That folder goes on the path once, and
every test imports the scripts by name, so that all of them see the same module objects: a script that adds its
variant to paper_table's table on import (decoder_table, probe_then_lora) adds it where the others look."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
