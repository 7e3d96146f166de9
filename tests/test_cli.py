
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
