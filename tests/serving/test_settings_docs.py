"""The settings' declaration against what documents it: README's configuration table and the
``--help`` of both shells (every variable, default and flag)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backend.__main__ import OPTIONS as BACKEND_OPTIONS
from backend.__main__ import parse_args as backend_args
from serving.settings import ENV, SETTINGS, Settings, default_text, main, markdown_table
from worker.__main__ import OPTIONS as WORKER_OPTIONS
from worker.__main__ import parse_args as worker_args
from worker.__main__ import settings_from as worker_settings

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START = "<!-- settings table: python -m serving.settings --markdown -->"
TABLE_END = "<!-- end of the settings table -->"
SHELLS = {"backend": (backend_args, BACKEND_OPTIONS), "worker": (worker_args, WORKER_OPTIONS)}


def readme_table() -> str:
    text = README.read_text()
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


def readme_rows() -> dict[str, tuple[list[str], str]]:
    """README's table: first variable -> (every variable of the row, the default cell)."""
    rows = {}
    for line in readme_table().splitlines()[2:]:
        variables_cell, default_cell, _ = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        variables = re.findall(r"`([A-Z0-9_]+)`", variables_cell)
        assert variables and variables[0] not in rows, line
        rows[variables[0]] = (variables, default_cell)
    return rows


def test_readme_lists_every_setting_with_its_variables_and_default():
    rows = readme_rows()
    for name, variables in ENV.items():
        assert variables[0] in rows, f"README's table has no row for {variables[0]}"
        listed, default = rows[variables[0]]
        assert listed == list(variables), variables[0]
        assert default == default_text(name), variables[0]


def test_readme_names_no_variable_the_settings_do_not_read():
    known = {variable for variables in ENV.values() for variable in variables}
    listed = {variable for variables, _ in readme_rows().values() for variable in variables}
    assert listed <= known, sorted(listed - known)


def test_readme_table_is_the_generated_one(capsys):
    assert main(["--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == markdown_table()
    assert readme_table() == printed, "regenerate it: python -m serving.settings --markdown"


@pytest.mark.parametrize("name", list(ENV))
def test_a_shown_default_read_from_env_is_the_default(name):
    """The default's text starts with what one would set in env to get the default."""
    default, shown = SETTINGS[name].default, default_text(name)
    if shown == "(empty)":
        assert default in (None, "")
        return
    value = getattr(Settings.from_env({ENV[name][0]: shown.split(" (")[0]}), name)
    assert value == default and type(value) is type(default)


def help_text(parse, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("shell", SHELLS)
def test_help_shows_every_setting_with_its_variables_and_default(shell, capsys):
    parse, options = SHELLS[shell]
    text = help_text(parse, capsys)
    for name, variables in ENV.items():
        names, default = " or ".join(variables), default_text(name)
        if name in options:  # a flag: its help ends with the variables and the default
            flag = f"--{name.replace('_', '-')}"
            assert flag in text and f"(env {names}; default: {default})" in text, name
        else:
            assert f"{names} (default: {default})" in text, name
        assert SETTINGS[name].metadata["help"].split()[0] in text


def test_backend_flags_are_settings_and_win_over_env(monkeypatch):
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("MODEL_DIR", "/from-env")
    args = backend_args(["--port", "4321", "--model-dir", "m", "--precision", "float16"])
    settings = Settings.from_env(**vars(args))
    assert (settings.port, settings.model_dir, settings.precision) == (4321, Path("m"), "float16")
    assert Settings.from_env(**vars(backend_args([]))).port == 1234
    with pytest.raises(SystemExit):
        backend_args(["--precision", "int8"])


def test_worker_flags_are_settings_and_win_over_env(monkeypatch):
    monkeypatch.setenv("WORKER_QUEUES", "batch")
    args = worker_args(["status", "--queues", "train", "--checkpoint", "c.pt", "--json"])
    settings = worker_settings(args)
    assert settings.queue_names == ("train",) and settings.checkpoint == Path("c.pt")
    assert args.command == "status" and args.json
    assert worker_settings(worker_args([])).queue_names == ("batch",)
