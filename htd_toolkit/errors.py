"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""


class UserError(RuntimeError):
    """Bad input or an unusable environment; the message names the file and the problem."""

    exit_code = 1


def check_number(option: str, value, low: float | None = None, high: float | None = None,
                 above: bool = False) -> None:
    """One line unless `value` (None passes) is a finite number with low <= value <= high (low < value when
    `above`). `option` is the flag as the user typed it, e.g. "--mpp"."""
    import math

    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = [f"{'above' if above else 'at least'} {low}" if low is not None else "",
                  f"at most {high}" if high is not None else ""]
        raise UserError(f"{option} {value}: expected a finite number {' and '.join(b for b in bounds if b)}".rstrip())
