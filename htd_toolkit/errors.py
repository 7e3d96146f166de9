"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""

import re

# torch re-raises an error of a DataLoader worker as the same type, with the worker's traceback for message
WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class UserError(RuntimeError):
    """Bad input or an unusable environment; the message names the file and the problem."""

    exit_code = 1

    def __init__(self, *args) -> None:
        if args and isinstance(args[0], str) and WORKER_TRACEBACK.match(args[0]):
            args = (args[0].rstrip().splitlines()[-1].split(": ", 1)[-1], *args[1:])  # the worker's own line
        super().__init__(*args)


class InputError(UserError, ValueError):
    """An input a pipeline cannot take (`HTDPipeline.check_inputs`): a ValueError, as diffusers raises, and one line
    from the CLI."""


def check_number(option: str, value, low: float | None = None, high: float | None = None,
                 above: bool = False, below: bool = False, whole: bool = False) -> None:
    """One line unless `value` (None passes) is a finite number with low <= value <= high (low < value when
    `above`, value < high when `below`), an integer when `whole`. `option` is the flag as the user typed it,
    e.g. "--mpp", or the field of a config file."""
    import math
    from numbers import Integral, Real  # NumPy's scalars too (np.float32(2.0) from a sweep is a number)

    if value is None:
        return
    ok = (isinstance(value, Integral if whole else Real) and not isinstance(value, bool)
          and (isinstance(value, Integral) or math.isfinite(value)))  # a 400-digit int is finite, and no float
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value < high if below else value <= high
    if not ok:
        bounds = [f"{'above' if above else 'at least'} {low}" if low is not None else "",
                  f"{'below' if below else 'at most'} {high}" if high is not None else ""]
        kind = "whole" if whole else "finite"
        raise UserError(f"{option} {value}: expected a {kind} number {' and '.join(b for b in bounds if b)}".rstrip())


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed, cut after `limit` characters), or its type's name."""
    text = " ".join(str(err).split())
    return (text[:limit] + "…" if len(text) > limit else text) or type(err).__name__
