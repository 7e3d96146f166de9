
from htd_toolkit import __version__
from tests.helpers import run_cli


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"htd-toolkit {__version__}"


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("prepare", "generate", "push", "evaluate", "demo", "sample-data", "embed", "cluster", "pseudo-maps"):
        assert command in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2
    assert "No such command" in err
    assert "Traceback" not in err


def test_shared_options_have_one_flag_and_one_help_everywhere():
    """Options several commands take (mpp, patch size, fractions, stride, split, shard size, seed, workers,
    keep-going, ...) come from htd_toolkit.cli_options: the same flags and help text in every command."""
    import typer.main

    from htd_toolkit.cli import app

    seen: dict[str, set] = {}

    def walk(command, path=""):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")
        for param in getattr(command, "params", []):
            if param.name in {"mpp", "patch_size", "min_fraction", "max_fraction", "min_tissue", "stride", "split",
                              "shard_size", "seed", "workers", "keep_going", "k", "slides", "slide_shard",
                              "crop_size", "overwrite", "tile_size", "encoder"}:
                seen.setdefault((param.name, tuple(param.opts)), set()).add(param.help)

    walk(typer.main.get_command(app))
    names = {name for name, _ in seen}
    assert {"mpp", "patch_size", "seed", "workers", "keep_going", "k", "overwrite"} <= names
    for (name, flags), helps in seen.items():
        assert len(helps) == 1 and None not in helps, (name, flags, helps)
        if name != "k":  # evaluate's --k is the neighbour count, a different option
            assert [f for n, f in seen if n == name] == [flags], name
    assert ("k", ("--num-clusters", "--k")) in seen
