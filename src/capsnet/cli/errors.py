"""Command-line behaviour: user errors end in one line and exit status 2, not a traceback.

Set HYDRA_FULL_ERROR=1 or CAPSNET_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import functools
import os
import sys

from capsnet.errors import CapsnetError

EXIT_USER_ERROR = 2


def debugging() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("CAPSNET_DEBUG") == "1"


def fail(message: str) -> None:
    print(f"capsnet: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def guarded(fn):
    """Run a Hydra task; a CapsnetError becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(cfg):
        from capsnet.cli.schema import validate

        try:
            validate(cfg)  # again: launcher jobs (submitit, joblib) reach here without train.py's preflight
            return fn(cfg)
        except CapsnetError as e:
            if debugging():
                raise
            fail(str(e))

    return wrapper


def preflight(argv: list[str], config_dir) -> None:
    """Refuse a bad command line in one line before Hydra starts (see capsnet.cli.preflight)."""
    if debugging():
        return
    from capsnet.cli.preflight import check_overrides

    try:
        check_overrides(argv, config_dir)
    except CapsnetError as e:
        fail(str(e))
