"""One format for the lines gptnano prints about a run.

Progress in a log file, validation results, the end of ``fit``, and the progress of a
comparison all read the same way: ``gptnano: `` then short fields joined by `` | ``,
e.g. ``gptnano: step 200/1000 | loss 1.8421 | 21.3k tok/s | ETA 1m04s``. A line is at
most ``MAX_WIDTH`` characters, so ``tail``, ``grep`` and a narrow terminal can use it.
No Lightning, no torch.
"""

import math
import sys

PREFIX = "gptnano: "
MAX_WIDTH = 200


def line(*fields: str) -> str:
    """``gptnano: a | b | c`` from the non-empty fields, cut to MAX_WIDTH characters."""
    text = PREFIX + " | ".join(f for f in fields if f)
    return text if len(text) <= MAX_WIDTH else text[: MAX_WIDTH - 1] + "…"


def say(*fields: str, file=None) -> None:
    """Print ``line(*fields)`` to stderr (or ``file``) at once: progress goes out as it happens. A
    stream that is gone (the terminal closed: SIGHUP, a dropped ssh session) loses the line, never
    the work around it."""
    try:
        print(line(*fields), file=file or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: a duration as people read it."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def steps_field(step: int, max_steps: int | None) -> str:
    """``step 200/1000`` (``step 200`` without a limit)."""
    return f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"
