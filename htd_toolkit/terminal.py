"""Console output: progress bars and run summaries (rich, on stderr so stdout stays parseable)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bars() -> Iterator:
    """Yields `bar(description, total)`: it adds a progress bar and returns its `advance(n=1)`. Nothing is
    drawn before the first bar, so an error raised earlier stays the only line on stderr."""
    progress = None

    def bar(description: str, total: int):
        nonlocal progress
        if progress is None:
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
            progress.start()
        task = progress.add_task(description, total=total)
        return lambda n=1: progress.advance(task, n)

    try:
        yield bar
    finally:
        if progress is not None:
            progress.stop()


@contextlib.contextmanager
def slide_progress() -> Iterator:
    """Yields a factory: `factory(total)` returns `advance(n)` for a progress bar over slides."""
    with progress_bars() as bar:
        yield lambda total: bar("slides", total)


@contextlib.contextmanager
def shard_progress() -> Iterator:
    """Yields `advance(n, total=None)` for a progress bar over shards (the bar appears at the first call,
    which gives the total)."""
    with progress_bars() as bar:
        advance = None

        def step(n: int = 1, total: int | None = None) -> None:
            nonlocal advance
            if advance is None:
                advance = bar("shards", total)
            advance(n)

        yield step


def print_prepare_report(report, out: Path) -> None:
    totals = report.totals
    table = Table(title="prepare", show_header=False)
    table.add_row("slides done", f"{totals['slides']} of {report.slides}")
    table.add_row("windows tried", str(totals["tried"]))
    table.add_row("patches kept", str(totals["kept"]))
    for reason, count in totals["rejected"].items():
        table.add_row(f"rejected: {reason}", str(count))
    table.add_row("crop-bank crops", str(totals["crops"]))
    if report.manifest:
        for split, count in report.manifest["splits"].items():
            table.add_row(f"{split} patches", str(count))
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    for failure in report.failures:
        console.print(f"[red]failed:[/red] {failure}", highlight=False, soft_wrap=True)
    if report.failures:
        console.print(f"{len(report.failures)} failure(s); finished slides are kept, rerun to resume.")
    elif report.pending:
        console.print(f"{report.pending} slide(s) belong to other shards; rerun without --slide-shard to merge.")
    if report.manifest:
        for warning in missing_crop_warnings(report.manifest):
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
        print(out)


def missing_crop_warnings(manifest: dict) -> list[str]:
    """One line per class the crop bank has no crop of: generation conditioned on crops would fail there."""
    from htd_toolkit.data.crops import crop_side_range

    config = manifest.get("config", {})
    low, high = crop_side_range(config.get("patch_size", 512), config.get("crop_size"))
    have = {record["class"] for record in manifest.get("crop_bank") or [] if record.get("samples")}
    return [f"no crop-bank crop of class {spec['name']!r}: no square of {low}–{high} px fits inside its regions "
            "in the train patches; lower --crop-size MIN,MAX or add slides with larger regions"
            for spec in manifest["classes"][1:] if spec["index"] not in have]
