"""The process of an analyze job: ``python -m pipeline.jobrun NICE CONFIG``.

Started by :func:`pipeline.job_analyze.spawn_pipeline` (in its own session, ``FACEPRO_DATA_DIR`` = the job's
folder, ``FACEPRO_JOB_ID`` = the job id): lowers its OS priority to niceness ``NICE`` (inherited by the
stage processes it starts, so the live cameras' processes get the cores first), then is ``facepro run
CONFIG`` (same exit codes; SIGINT drains, a second SIGINT kills the stages).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    """Run the job's pipeline; returns ``facepro run``'s exit code (2 on bad arguments)."""
    if len(argv) != 2 or not argv[0].lstrip("-").isdigit():
        print("usage: python -m pipeline.jobrun NICE CONFIG", file=sys.stderr)
        return 2
    increment = int(argv[0]) - os.nice(0)
    if increment > 0:
        os.nice(increment)
    from pipeline.cli import main as cli

    return cli(["run", argv[1]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
