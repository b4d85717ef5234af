"""The command line: --help everywhere, clear errors with exit code 2 for bad configs and inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tagray.cli import build_parser, main

from .factories import tiny_pipeline


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


@pytest.fixture(scope="module")
def tiny_tagset(tiny_base_dir, tmp_path_factory):
    """A two-stage tag set on the tiny base (saved folder), trained for two steps."""
    from tagray.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("cli-runs")
    cfg = tiny_pipeline(tiny_base_dir, str(out), name="cli")
    return run_pipeline(cfg)["single"]["path"]


def test_predict_and_eval_on_a_trained_tagset(tiny_tagset, capsys, tmp_path):
    assert main(["predict", tiny_tagset, "--task", "qed", "--input", "smiles=CCO"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["smiles"] == "CCO" and isinstance(line["prediction"], float)
    csv = tmp_path / "in.csv"
    csv.write_text("smiles\nCCO\nc1ccccc1O\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(["predict", tiny_tagset, "--task", "qed", "--input-file", str(csv), "--output", str(out)]) == 0
    )
    assert len(out.read_text().strip().splitlines()) == 2
    assert main(["eval", tiny_tagset, "--task", "qed", "--limit", "4"]) == 0
    assert "mse" in capsys.readouterr().out
    assert main(["tags", tiny_tagset]) == 0
    assert "<QED>" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,field",
    [
        (["--task", "qed", "--input", "smiles=C1CC(("], "smiles"),
        (["--task", "qed", "--input", "smi=CCO"], "smiles"),
        (["--task", "no_such_task", "--input", "smiles=CCO"], "task"),
        (["--task", "qed", "--input-file", "/no/such/file.csv"], "source.path"),
        (["--task", "qed"], "--input"),
    ],
)
def test_predict_bad_inputs_exit_2(tiny_tagset, capsys, args, field):
    assert main(["predict", tiny_tagset, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}"), err


def test_tags_from_another_base_are_refused(tiny_tagset, capsys, tmp_path, tiny_gpt2):
    tiny_gpt2.model.save_pretrained(tmp_path / "gpt2")
    tiny_gpt2.tokenizer.save_pretrained(tmp_path / "gpt2")
    assert (
        main(
            [
                "predict",
                tiny_tagset,
                "--task",
                "qed",
                "--input",
                "smiles=CCO",
                "--base",
                str(tmp_path / "gpt2"),
            ]
        )
        == 2
    )
    assert "trained on base llama" in capsys.readouterr().err
