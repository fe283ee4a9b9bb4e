"""The command line's grammar over every command, in-process (no node needed): the shared
options, JSON errors, completion scripts and `plugshare config`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from plugshare import cli as cli_module
from plugshare.cli import cli


def _walk(command: click.Command, path: tuple[str, ...] = ()):
    """(path, command) for the root, every group and every command below it, the lazily
    loaded ones included."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1] if path else "plugshare")
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(cli))
LEAVES = [(p, c) for p, c in COMMANDS if not isinstance(c, click.Group)]


def _placeholders(command: click.Command) -> list[str]:
    """Values for the required arguments and options, so that only the grammar is tested."""
    args = []
    for param in command.params:
        if not param.required:
            continue
        value = param.type.choices[0] if isinstance(param.type, click.Choice) else "x"
        if isinstance(param, click.Argument):
            args.append(value)
        else:
            args += [param.opts[0], value]
    return args


def _ids(items):
    return [" ".join(p) or "plugshare" for p, _ in items]


def test_the_walk_sees_the_whole_tree():
    names = {" ".join(p) for p, _ in COMMANDS}
    for expected in ("status", "share show", "doc put", "rule add", "watch", "demo", "config",
                     "completion"):
        assert expected in names


@pytest.mark.parametrize("path, command", COMMANDS, ids=_ids(COMMANDS))
def test_every_command_takes_json_and_home_after_it(tmp_path, path, command):
    done = CliRunner().invoke(cli, [*path, "--json", "--home", str(tmp_path), "--help"])
    assert done.exit_code == 0, done.output
    assert "--json" in done.stdout and "--home" in done.stdout


@pytest.mark.parametrize("path, command", LEAVES, ids=_ids(LEAVES))
def test_options_after_the_command_reach_its_context(tmp_path, monkeypatch, path, command):
    seen = []

    def record(*_args, **_kwargs):
        seen.append(click.get_current_context().find_object(cli_module.Context))

    monkeypatch.setattr(command, "callback", record)
    runner = CliRunner(env={"PLUGSHARE_HOME": None})
    after = runner.invoke(cli, [*path, *_placeholders(command), "--json", "--home",
                                str(tmp_path / "after")])
    assert after.exit_code == 0, after.output
    before = runner.invoke(cli, ["--home", str(tmp_path / "before"), *path,
                                 *_placeholders(command)])
    assert before.exit_code == 0, before.output
    assert [(c.home.root, c.as_json) for c in seen] == [
        (tmp_path / "after", True), (tmp_path / "before", False)]


def test_a_nested_group_takes_them_between_its_words(tmp_path, monkeypatch):
    seen = []
    show = cli.get_command(click.Context(cli), "share").get_command(click.Context(cli), "show")
    monkeypatch.setattr(show, "callback", lambda **kw: seen.append(
        (click.get_current_context().find_object(cli_module.Context), kw)))
    done = CliRunner().invoke(cli, ["share", "--json", "show", "my notes", "--home",
                                    str(tmp_path)])
    assert done.exit_code == 0, done.output
    (ctx, kwargs), = seen
    assert ctx.as_json and ctx.home.root == tmp_path and kwargs == {"name": "my notes"}


# -- errors with --json ---------------------------------------------------------------


def test_usage_errors_with_json_are_json_on_stdout_exit_2(tmp_path):
    runner = CliRunner()
    for args in (["status", "--bogus", "--json"], ["--json", "doc", "put"],
                 ["doc", "put", "--json"], ["--json", "nosuchcommand"],
                 ["init", "--json", "--store", "mongo", "--home", str(tmp_path)]):
        done = runner.invoke(cli, args)
        assert done.exit_code == 2, (args, done.output)
        error = json.loads(done.stdout)
        assert error["error"] == "usage" and error["reason"], args
        assert done.stderr == "", args
    text = runner.invoke(cli, ["status", "--bogus"])
    assert text.exit_code == 2 and "Usage:" in text.stderr and text.stdout == ""


def test_failures_with_json_are_json_on_stdout_exit_1(tmp_path):
    done = CliRunner().invoke(cli, ["status", "--json", "--home", str(tmp_path / "none")])
    assert done.exit_code == 1
    error = json.loads(done.stdout)
    assert set(error) == {"error", "reason"}
    assert error["error"] == "node_unreachable" and "plugshare init" in error["reason"]
    assert done.stderr == ""


def test_json_errors_are_documented_in_the_help():
    text = CliRunner().invoke(cli, ["--help"]).stdout
    assert '{"error": ..., "reason": ...}' in text and "stdout" in text
    assert "--json" in CliRunner().invoke(cli, ["doc", "get", "--help"]).stdout


# -- completion -----------------------------------------------------------------------


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"),
                                           ("zsh", "#compdef plugshare"),
                                           ("fish", "complete --no-files --command plugshare")])
def test_completion_prints_the_shell_script(shell, marker):
    done = CliRunner().invoke(cli, ["completion", shell])
    assert done.exit_code == 0, done.output
    assert marker in done.stdout and "_PLUGSHARE_COMPLETE" in done.stdout


def test_completion_is_documented_and_refuses_other_shells():
    help_text = CliRunner().invoke(cli, ["--help"]).stdout
    assert "completion" in help_text
    done = CliRunner().invoke(cli, ["completion", "--help"])
    assert 'eval "$(plugshare completion bash)"' in done.stdout
    assert CliRunner().invoke(cli, ["completion", "tcsh"]).exit_code == 2


def test_the_completion_script_answers(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "plugshare"], capture_output=True, text=True, timeout=60,
        env={"_PLUGSHARE_COMPLETE": "bash_complete", "COMP_WORDS": "plugshare sh",
             "COMP_CWORD": "1", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert "plain,share" in done.stdout.splitlines()


# -- plugshare config -----------------------------------------------------------------


def _home_with(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "h"
    home.mkdir()
    (home / "node.toml").write_text(text)
    return home


def test_config_says_where_each_value_comes_from(tmp_path):
    home = _home_with(tmp_path, '[node]\nname = "bob"\n[peer]\nlisten = "0.0.0.0:9000"\n')
    done = CliRunner(env={"PLUGSHARE_HOME": None}).invoke(cli, ["config", "--json", "--home",
                                                                str(home)])
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout)
    assert info["home"] == {"value": str(home), "source": "--home"}
    assert info["file"] == str(home / "node.toml") and info["file_exists"] is True
    values = info["values"]
    assert values["node"]["name"] == {"value": "bob", "source": "node.toml"}
    assert values["peer"]["listen"] == {"value": "0.0.0.0:9000", "source": "node.toml"}
    assert values["api"]["listen"] == {"value": "127.0.0.1:7414", "source": "default"}
    assert values["store"]["url"] == {"value": None, "source": "default"}
    assert values["peer"]["static"] == {"value": [], "source": "default"}

    text = CliRunner(env={"PLUGSHARE_HOME": str(home)}).invoke(cli, ["config"])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert any(l.startswith(f"# home {home}") and "environment" in l for l in lines)
    assert any(l.startswith('name = "bob"') and l.endswith("# node.toml") for l in lines)
    assert any(l.startswith('listen = "127.0.0.1:7414"') and l.endswith("# default")
               for l in lines)
    assert any(l.startswith("# url") and "not set" in l for l in lines)


def test_config_without_a_home_shows_the_defaults(tmp_path):
    done = CliRunner().invoke(cli, ["config", "--json", "--home", str(tmp_path / "none")])
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout)
    assert info["file_exists"] is False
    assert {v["source"] for section in info["values"].values() for v in section.values()} == {
        "default"}


def test_config_with_a_bad_file_names_file_and_key(tmp_path):
    home = _home_with(tmp_path, "[node]\nnmae = 'x'\n")
    done = CliRunner().invoke(cli, ["config", "--home", str(home)])
    assert done.exit_code == 1
    assert str(home / "node.toml") in done.stderr and "nmae" in done.stderr


def test_config_example_is_the_packaged_commented_example(tmp_path):
    from importlib.resources import files

    done = CliRunner().invoke(cli, ["config", "--example"])
    assert done.exit_code == 0, done.output
    packaged = files("plugshare").joinpath("node_example.toml").read_text(encoding="utf-8")
    assert done.stdout == packaged
    assert done.stdout.startswith("# plugshare node configuration")
    (tmp_path / "node.toml").write_text(done.stdout)
    from plugshare.config import load_config

    load_config(tmp_path / "node.toml")  # valid as it is
    help_text = CliRunner().invoke(cli, ["config", "--help"]).stdout
    assert "--example" in help_text


def test_pyproject_ships_the_example_as_package_data():
    import tomllib

    root = Path(__file__).resolve().parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "node_example.toml" in pyproject["tool"]["setuptools"]["package-data"]["plugshare"]
    # One copy of the example, the packaged one; the repository's node.toml points to it.
    example = root / "node.toml"
    assert example.is_symlink() and example.resolve() == root / "plugshare" / "node_example.toml"
