"""The command line: --help everywhere, clear errors with exit code 2 for bad configs and inputs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tagray.cli import build_parser, main


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "tagray.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert {"pipeline", "stage", "eval", "predict", "tasks", "tags", "validate-cluster"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: tagray" in capsys.readouterr().out


def test_tasks_lists_builtin_tasks(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "qed" in out and "translate" in out and "regression" in out


@pytest.mark.parametrize(
    "yaml_text,field",
    [
        ("name: x\nstages: []\n", "stages"),
        ("name: x\nstages:\n  - {name: s, tasks: [qed], train: {lr: -1}}\n", "stages[0].train.lr"),
        ("name: x\nstages:\n  - {name: s, tasks: [no_such_task]}\n", "task"),
        ("name: x\nbogus: 1\nstages:\n  - {name: s, tasks: [qed]}\n", "bogus"),
        ("name: [unclosed\n", "config"),
    ],
)
def test_bad_pipeline_configs_exit_2_naming_the_field(tmp_path, capsys, yaml_text, field):
    p = tmp_path / "p.yaml"
    p.write_text(yaml_text)
    code = main(["pipeline", str(p), "--local"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {field}"), err


def test_missing_config_file_and_bad_override(tmp_path, capsys):
    assert main(["pipeline", str(tmp_path / "nope.yaml"), "--local"]) == 2
    assert "does not exist" in capsys.readouterr().err
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nstages:\n  - {name: s, tasks: [qed]}\n")
    assert main(["pipeline", str(p), "--local", "--set", "no-equals-sign"]) == 2
    assert "--set" in capsys.readouterr().err


def test_wrong_tag_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["tags", str(tmp_path)]) == 2
    assert "tagset.json" in capsys.readouterr().err


def test_validate_cluster_cli(capsys):
    assert main(["validate-cluster", "cluster.yaml"]) == 0
    assert "OK" in capsys.readouterr().out


def test_console_script_runs():
    r = run("--help")
    assert r.returncode == 0 and "pipeline" in r.stdout
