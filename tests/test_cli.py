import pytest

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
                              "crop_size", "overwrite", "tile_size", "encoder", "revision", "base_model",
                              "crop_bank", "steps", "guidance"}:
                seen.setdefault((param.name, tuple(param.opts)), set()).add(param.help)

    walk(typer.main.get_command(app))
    names = {name for name, _ in seen}
    assert {"mpp", "patch_size", "seed", "workers", "keep_going", "k", "overwrite", "steps", "guidance"} <= names
    for (name, flags), helps in seen.items():
        assert len(helps) == 1 and None not in helps, (name, flags, helps)
        if name not in ("k", "steps"):  # evaluate's --k is the neighbour count, pretrain-base's --steps training steps
            assert [f for n, f in seen if n == name] == [flags], name
    assert ("k", ("--num-clusters", "--k")) in seen
    assert ("steps", ("--num-inference-steps", "--steps")) in seen  # the pipeline's name, the old one an alias
    assert ("guidance", ("--guidance-scale", "--guidance")) in seen


def command_options() -> dict[str, dict]:
    """{command: {flag: default}} of every `htd-toolkit` command, as click parses them."""
    import typer.main

    from htd_toolkit.cli import app

    def walk(command, prefix=()):
        if hasattr(command, "commands"):
            return {name: options for sub_name, sub in command.commands.items()
                    for name, options in walk(sub, (*prefix, sub_name)).items()}
        return {" ".join(prefix): {flag: p.default for p in command.params for flag in p.opts + p.secondary_opts
                                   if flag.startswith("-")}}

    return walk(typer.main.get_command(app))


def test_every_flag_of_the_2026_12_06_command_line_still_works_with_the_same_default():
    """Options moved to one declaration each (and renamed after the pipeline's arguments, the old names kept as
    aliases): the command line of 2026-12-06 (tests/fixtures/cli_options_2026-12-06.json, recorded from that
    commit) must still parse, with the same defaults."""
    import json
    from pathlib import Path

    before = json.loads((Path(__file__).parent / "fixtures" / "cli_options_2026-12-06.json").read_text())
    now = command_options()
    for command, options in before.items():
        assert command in now, command
        for flag, default in options.items():
            assert flag in now[command], f"{command} {flag}"
            assert now[command][flag] == default or str(now[command][flag]) == default, (command, flag)


def test_packaged_config_names_are_not_shadowed_by_the_current_directory(tmp_path, monkeypatch, capsys):
    """A bare name is a packaged config whatever the current directory holds (`htd-toolkit demo` failed
    when it held `demo/`); a file is named as a path (a .yaml suffix or a folder part)."""
    from htd_toolkit.recipes.train_controlnet import CONFIGS, packaged_configs, training_args

    from htd_toolkit.errors import UserError

    monkeypatch.chdir(tmp_path)
    names = packaged_configs()
    assert "demo" in names
    for name in names:
        (tmp_path / name).mkdir()
        assert training_args(name).config == CONFIGS / f"{name}.yaml"
    (tmp_path / "mine").write_text("resolution: 32\n")
    assert training_args("./mine").resolution == 32
    with pytest.raises(UserError) as refused:
        training_args("mine")
    assert str(refused.value) == ("--config mine: no packaged config of that name (camelyon16, demo, panda, tcga); "
                                  "a YAML file is given by its path: ./mine")


def test_htd_toolkit_demo_runs_with_a_demo_folder_in_the_current_directory(tmp_path, monkeypatch):
    from htd_toolkit.recipes import train_controlnet

    from htd_toolkit import demo as demo_module

    seen = {}

    def train(args):  # the demo's training step, stopped once its options are read
        seen["config"], seen["base"] = args.config, args.pretrained_model_name_or_path
        return 1

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    monkeypatch.setattr(train_controlnet, "main", train)
    monkeypatch.setattr(demo_module, "prepare", lambda paths, unannotated: None)
    with pytest.raises(demo_module.UserError, match="the demo's training step failed"):
        demo_module.run_demo(tmp_path / "out")
    assert seen["config"] == train_controlnet.CONFIGS / "demo.yaml"


@pytest.mark.parametrize("base, problem", [
    ("he_base_cc0", "not a local folder, nor a model on the Hub"),
    ("no-such-org/no-such-base", "not a local folder, nor a model on the Hub"),
])
def test_a_base_neither_local_nor_on_the_hub_is_one_line_in_seconds(prepared, tmp_path, capsys, base, problem):
    import time

    from htd_toolkit.recipes.train_controlnet import cli as train

    started = time.monotonic()
    code = train(["--config", "demo", "--pretrained_model_name_or_path", base, "--train_data_dir", str(prepared),
                  "--output_dir", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == f"error: --pretrained_model_name_or_path {base}: {problem}", err
    assert time.monotonic() - started < 10


def test_an_unreachable_hub_is_one_line_in_seconds(prepared, tmp_path, capsys, monkeypatch):
    import time

    from htd_toolkit.recipes.train_controlnet import cli as train
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline
    started = time.monotonic()
    code = train(["--config", "demo", "--pretrained_model_name_or_path", "some-org/some-base", "--train_data_dir",
                  str(prepared), "--output_dir", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "--pretrained_model_name_or_path some-org/some-base: not a local folder, and the Hub cannot be reached" in err
    assert time.monotonic() - started < 10


def test_the_demo_config_names_the_shipped_base(prepared, tmp_path, monkeypatch):
    """`--config demo` alone (an installed wheel, offline) resolves its base to the toy base in the package."""
    from htd_toolkit.recipes.train_controlnet import check_inputs, training_args
    from huggingface_hub import constants

    from htd_toolkit.base.shipped import shipped_base

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "he_base_cc0").mkdir()  # a folder named like the base does not shadow it either
    args = training_args("demo", train_data_dir=str(prepared), output_dir=str(tmp_path / "model"))
    check_inputs(args)
    assert args.pretrained_model_name_or_path == str(shipped_base())


@pytest.mark.parametrize("text", ["0/0", "3/2", "-1/2", "1/2/3", "a/b", "²/3", "0/³", "0/" + "9" * 5000])
def test_a_bad_shard_index_is_one_line(text):
    """`--shard` / `--slide-shard` INDEX/COUNT: ASCII digits only (str.isdigit takes '²', which int() refuses, and
    int() refuses more than 4300 digits)."""
    from htd_toolkit.cli import parse_slide_shard
    from htd_toolkit.errors import UserError

    with pytest.raises(UserError, match=r"^--shard .*: expected INDEX/COUNT such as 0/4$"):
        parse_slide_shard(text, "--shard")
