"""Check a command line's overrides before Hydra runs anything, and fail in one line.

Hydra reports a bad override over several lines; researchers mistype overrides
at the start of a long job. `check_overrides` composes the config as the run
will (every value of a sweep, one at a time), validates the ranges, and turns
the first problem into one line that names the override and the fix.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from capsnet.errors import CapsnetError

# Flags after which Hydra does something other than run: leave those to Hydra.
HYDRA_ONLY_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                    "--version", "--resolve", "-p", "--package", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun"}


def _first(text: str) -> str:
    return str(text).strip().splitlines()[0].strip() if str(text).strip() else ""


def _full_key(err: BaseException) -> str | None:
    m = re.search(r"full_key: (\S+)", str(err))
    return m.group(1) if m else None


def explain(err: BaseException, override: str | None) -> str:
    """One line for a composition error: what is wrong, in which override, how to fix it."""
    cause = err.__cause__ or err
    where = f" (in '{override}')" if override else ""
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = _full_key(cause) or (override or "?").split("=")[0].lstrip("+~")
        return (f"unknown config key '{key}'{where}: check the spelling; "
                "`python train.py --cfg job` prints every key")
    if isinstance(cause, ValidationError):
        key = _full_key(cause) or "?"
        return f"bad value for '{key}'{where}: {_first(cause)}; give a value of that type"
    if isinstance(err, MissingConfigException):
        options = re.findall(r"^\t(\S+)$", str(err), flags=re.M)
        options = [o for o in options if "=" not in o and "://" not in o]
        hint = f"; choose one of: {', '.join(options)}" if options else ""
        return f"{_first(err).removeprefix(chr(10))}{where}{hint}"
    return f"{_first(err)}{where}" + (f": {_first(cause)}" if cause is not err else "")


def expand(overrides: list[str]) -> list[list[str]]:
    """The override lists to check: the first value of every sweep, then each other value in turn."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = []
    for text, o in zip(overrides, parsed):
        key = text.split("=", 1)[0]
        vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [None]
        values.append([text] if vals == [None] else [f"{key}={v}" for v in vals])
    base = [v[0] for v in values]
    variants = [base]
    for i, vals in enumerate(values):
        variants += [base[:i] + [v] + base[i + 1:] for v in vals[1:]]
    return variants


def check_overrides(argv: list[str], config_dir: Path, config_name: str = "train") -> None:
    """Raise a one-line CapsnetError for the first override that cannot compose or validate."""
    from capsnet.cli.schema import validate

    if any(a.split("=")[0] in HYDRA_ONLY_FLAGS for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        variants = expand(overrides)
    except HydraException as e:
        bare = [o for o in overrides if "=" not in o and not o.startswith(("+", "~"))]
        hint = (f"; '{bare[0]}' is not key=value: a value with spaces must be quoted as one argument, "
                "e.g. 'out_dir=my runs/a'") if bare else ""
        raise CapsnetError(f"cannot parse the overrides: {_first(e)}{hint}") from None
    cli_multirun = any(a in ("-m", "--multirun") for a in argv)
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        for variant in variants:
            try:
                cfg = compose(config_name, overrides=variant, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as e:
                raise CapsnetError(explain(e, _culprit(e, variant))) from None
            validate(cfg)
        multirun = cli_multirun or str(cfg.hydra.mode).endswith("MULTIRUN")  # -m, or a sweep preset
        check_output_folder(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir,
                            "hydra.sweep.dir" if multirun else "hydra.run.dir")


def check_output_folder(path: str, key: str) -> None:
    """The folder Hydra will create must sit under a writable folder, not under a file."""
    target = Path(path).absolute()
    parent = target
    while not parent.exists():
        parent = parent.parent
    writable = parent.is_dir() and os.access(parent, os.W_OK)
    if writable:  # access() says yes to root everywhere, /proc included: try it
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".capsnet-probe-", dir=parent))
        except OSError:
            writable = False
    if not writable:
        choose = "out_dir=... (or hydra.run.dir=...)" if key == "hydra.run.dir" else f"{key}=..."
        raise CapsnetError(f"cannot create the run directory {target}: {parent} is not a writable folder; "
                           f"choose another with {choose}")


def _culprit(err: BaseException, overrides: list[str]) -> str | None:
    text = str(err) + " " + str(err.__cause__ or "")
    key = _full_key(err.__cause__ or err)
    for o in overrides:
        k = o.split("=", 1)[0].lstrip("+~")
        if (key and k == key) or f"'{k}'" in text or o in text or f"'{k}/" in text:
            return o
    return None
