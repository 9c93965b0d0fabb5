"""User-facing errors: one clear line naming the file, key or field, never a traceback wall."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad config, bad path, bad input); printed as one line."""

    exit_code = 2


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script main: UserError and Ctrl-C become one line and an exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
