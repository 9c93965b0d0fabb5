"""How a rank script run under torchrun hands its result to its test: one line on stdout,
`RANK<r> <json>`, read back by the `torchrun_ranks` fixture (tests/conftest.py)."""

import json
import sys


def report(rank: int, result: dict) -> None:
    # One write, newline included: print() writes the newline apart, and another rank's line
    # can land between the two.
    sys.stdout.write(f"RANK{rank} {json.dumps(result)}\n")
    sys.stdout.flush()
