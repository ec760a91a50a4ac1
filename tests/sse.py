"""Reading Server-Sent Events in tests (the jobs API's progress stream, ``text/event-stream``)."""

from __future__ import annotations

import json
from typing import Iterable


def sse_events(lines: Iterable[str]) -> list[tuple[str | None, dict]]:
    """``(event name, JSON data)`` of each ``event:``/``data:`` pair of an SSE stream's lines (comments skipped)."""
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out
