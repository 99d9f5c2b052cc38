"""Any command line a user can type ends in a result or in one line that names the key.

The matrix is generated from the config schema (alexnet_lab/config.py), the Trainer arguments
conf/trainer/default.yaml sets (their types from pytorch_lightning.Trainer's own annotations)
and every optimizer's arguments: for each key a value of the wrong type and, where the key has
a range, one outside it. Each runs ``python train.py`` in this process (the same entry point,
without a new interpreter per case) and must end with exit 2, one ``error:`` line naming the
key, no traceback, and ``failed`` in the run's metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from typing import Any

import pytest
import pytorch_lightning as pl
import yaml
from conftest import CONF_DIR, ROOT, run_in_process, run_train, tiny_overrides

from alexnet_lab import config
from alexnet_lab.errors import accepts, defaults

#: keys that are not the user's to set: run_name is an interpolation of Hydra's overrides
NOT_SET_BY_USERS = {"run_name", "data.name"}


def wrong_type(kind: Any) -> str | None:
    """An override value Hydra parses to something ``kind`` does not accept (None: anything goes)."""
    for value, text in (("abc", "abc"), (True, "true"), ([1, 2], "[1,2]"), (7, "7")):
        if not accepts(kind, value):
            return text
    return None


def out_of_range(rule: dict[str, Any], kind: Any) -> str | None:
    """An override value just outside a ``setting`` rule, or None where the key has no range."""
    if not rule:
        return None
    if rule.get("choices") is not None:
        return "bogus"
    integer = int in (kind, *typing.get_args(kind))
    for bound, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if rule.get(bound) is not None:
            value = rule[bound] + (step if integer else step / 2)
            return str(int(value)) if integer else str(float(value))
    return None


def schema_cases(schema: type, prefix: str, select: tuple[str, ...] = ()) -> list[tuple[list[str], str, str]]:
    """(overrides, key, kind of mistake) for every field of a config dataclass, nested ones included."""
    cases = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}.{field.name}" if prefix else field.name
        kind = hints[field.name]
        nested = [arg for arg in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(arg)]
        if nested:
            cases += schema_cases(nested[0], key, select)
            continue
        if key in NOT_SET_BY_USERS or key in ("optim", "scheduler", "trainer", "logger", "callbacks"):  # groups
            continue
        for mistake, value in (("type", wrong_type(kind)), ("range", out_of_range(dict(field.metadata), kind))):
            if value is not None:
                cases.append(([*select, f"{key}={value}"], key, mistake))
    return cases


def valid_value(rule: dict[str, Any], kind: Any, default: Any) -> str | None:
    """An override value inside a ``setting`` rule other than the extremes (or None: no range to probe)."""
    if rule.get("choices") is not None:
        others = [choice for choice in rule["choices"] if choice != default]
        return json.dumps(others[0]) if others else None
    if kind is bool:
        return json.dumps(not default)
    low = next((rule[bound] for bound in ("ge", "gt") if rule.get(bound) is not None), None)
    if default is None and low is not None:  # an optional setting: its least value
        return str(low)
    if kind is int and low is None:
        return str(default + 1)
    if low is None or not isinstance(default, (int, float)):
        return None
    middle = (low + default) / 2  # between the bound and the default: valid, and not a degenerate setting
    integer = int in (kind, *typing.get_args(kind))
    return str(int(middle)) if integer else str(middle)


def valid_cases(schema: type, prefix: str, select: tuple[str, ...] = ()) -> list[tuple[list[str], str]]:
    cases = []
    hints, values = typing.get_type_hints(schema), defaults(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}.{field.name}" if prefix else field.name
        nested = [
            arg for arg in (hints[field.name], *typing.get_args(hints[field.name])) if dataclasses.is_dataclass(arg)
        ]
        if nested:
            cases += valid_cases(nested[0], key, select)
        elif (value := valid_value(dict(field.metadata), hints[field.name], values[field.name])) is not None:
            needs = ["optim.momentum=0.9"] if key == "optim.nesterov" else []  # Nesterov needs momentum
            cases.append(([*select, f"{key}={value}", *needs], key))
    return cases


def trainer_cases() -> list[tuple[list[str], str, str]]:
    declared = typing.get_type_hints(pl.Trainer.__init__)
    cases = []
    for key in yaml.safe_load((CONF_DIR / "trainer" / "default.yaml").read_text()):
        cases.append(([f"trainer.{key}={wrong_type(declared[key])}"], f"trainer.{key}", "type"))
    for key, rule in config.TRAINER_RULES.items():
        cases.append(([f"trainer.{key}={out_of_range(rule, int)}"], f"trainer.{key}", "range"))
    # what Lightning itself refuses: the names and counts it knows
    for key, value in (("accelerator", "bogus"), ("devices", "0"), ("strategy", "bogus"), ("precision", "bogus")):
        cases.append(([f"trainer.{key}={value}"], f"trainer.{key}", "range"))
    return cases


CASES = (
    schema_cases(config.LabConfig, "")
    + [case for name, schema in config.OPTIMIZERS.items() for case in schema_cases(schema, "optim", (f"optim={name}",))]
    + [
        case
        for name, schema in config.SCHEDULERS.items()
        for case in schema_cases(schema, "scheduler", (f"scheduler={name}",))
    ]
    + trainer_cases()
)


VALID = (
    valid_cases(config.LabConfig, "")
    + [case for name, schema in config.OPTIMIZERS.items() for case in valid_cases(schema, "optim", (f"optim={name}",))]
    + [
        case
        for name, schema in config.SCHEDULERS.items()
        for case in valid_cases(schema, "scheduler", (f"scheduler={name}",))
        if case[1] != "scheduler.warmup_epochs" or name != "plateau"  # refused: plateau has no warm-up
    ]
    + [
        ([f"trainer.{key}={(rule['ge'] + 10) // 2}"], f"trainer.{key}")
        for key, rule in config.TRAINER_RULES.items()
        if key != "max_epochs"
    ]
)


def test_the_matrix_covers_every_key_of_the_schema():
    keys = {key for _, key, _ in CASES}
    assert {
        "model.downscale",
        "optim.momentum",
        "data.augmentation.flip",
        "data.discard.min_std",
        "data.synthetic.counts",
        "verdicts.window",
        "divergence.max_train_loss",
        "seed",
        "resume",
        "trainer.precision",
        "trainer.devices",
        "trainer.accelerator",
    } <= keys
    assert len(CASES) > 100


@pytest.mark.parametrize(("overrides", "key", "mistake"), CASES, ids=[" ".join(case[0]) for case in CASES])
def test_a_wrong_value_ends_in_one_line_naming_its_key(tmp_path, monkeypatch, overrides, key, mistake):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # run_command sets it for Hydra; restored after the test
    run_dir = tmp_path / "run"
    code, out, err = run_in_process([*tiny_overrides(tmp_path), *overrides, f"hydra.run.dir={run_dir}"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1 and key in errors[0], err
    assert "Traceback" not in out + err
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "raw").exists(), "found before any data work"


@pytest.mark.parametrize("users", [None, "0"])
def test_a_command_leaves_hydra_full_error_as_the_user_had_it(tmp_path, monkeypatch, users):
    # run_command sets it for Hydra while it runs; a later command in the same process (a notebook's,
    # a subprocess it starts) must not see it, or its errors come with tracebacks
    if users is None:
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", users)
    code, _, _ = run_in_process([*tiny_overrides(tmp_path), "model.downscale=0", f"hydra.run.dir={tmp_path / 'r'}"])
    assert code == 2 and os.environ.get("HYDRA_FULL_ERROR") == users


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "key"), VALID, ids=[" ".join(case[0]) for case in VALID])
def test_a_valid_value_of_each_key_still_trains(tmp_path, monkeypatch, overrides, key):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    run_dir = tmp_path / "run"
    code, _, err = run_in_process([*tiny_overrides(tmp_path), *overrides, f"hydra.run.dir={run_dir}"])
    assert code == 0, err[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] in ("ok", "diverged") and metrics["epochs"] == 1, key


# --------------------------------------------------------------------------- as typed, in a shell


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.accelerator=gpu"], "trainer.accelerator=gpu: no GPU here; use trainer.accelerator=auto or cpu"),
        (["trainer.precision=bogus"], "trainer.precision='bogus'"),
        (["trainer.devices=0"], "trainer.devices=0"),
        (["+trainer.nosuch=1"], "trainer.nosuch"),
        (["optim=sgd", "optim.momentum=-3"], "optim.momentum=-3"),
    ],
)
def test_the_issues_five_command_lines(tmp_path, args, expected):
    result = run_train([*args, "data.image_size=64", "trainer.max_epochs=1"], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    assert "Traceback" in (run_dir / "train.log").read_text()  # the traceback is kept, in the run's log


@pytest.mark.slow
def test_a_bad_trainer_value_fails_its_job_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "trainer.devices=0,1", *tiny_overrides(tmp_path), f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    statuses = {
        path.name: json.loads((path / "metrics.json").read_text())["status"]
        for path in sweep.iterdir()
        if (path / "metrics.json").exists()
    }
    assert sorted(statuses.values()) == ["failed", "ok"], statuses
    assert "trainer.devices=0" in result.stderr


@pytest.mark.slow
def test_the_readme_recipes_for_a_trained_model_run_as_written_on_a_sweep_job(tmp_path, make_raw):
    # a sweep job's run dir is named after its overrides: "=" and "," in it, as the sweep printed it
    sweep = tmp_path / "sweep"
    done = run_train(
        ["-m", "model.dropout=0.5", *tiny_overrides(tmp_path, epochs=2), f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = [path for path in sweep.iterdir() if path.is_dir()]
    assert "=" in run.name and "," in run.name
    make_raw({"cat": 4, "dog": 3}, name="new")
    (tmp_path / "more").mkdir()
    for name in ("photo.jpg", "more/a.png", "more/b.png"):
        (tmp_path / name).write_bytes((tmp_path / "new" / "cat" / "cat_000.png").read_bytes())
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "c.png").write_bytes((tmp_path / "new" / "dog" / "dog_000.png").read_bytes())
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Use a trained model", 1)[1].split("```", 2)[1]
    recipes = [line.split("#")[0].split() for line in block.splitlines() if line.startswith("python ")]
    assert len(recipes) >= 5
    for words in recipes:
        words = [word.replace("$RUN", str(run)) for word in words]
        if "more/*.png" in words:  # the shell's glob
            at = words.index("more/*.png")
            words[at : at + 1] = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "more").glob("*.png"))
        result = subprocess.run(
            [sys.executable, str(ROOT / words[1]), *words[2:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (words, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert (tmp_path / "preds.csv").read_text().count("\n") == 2  # header + folder/c.png
    assert list(run.glob("eval_best_*.json"))
    resumed = run_train(
        [*tiny_overrides(tmp_path, epochs=2), "model.dropout=0.5", f"hydra.run.dir={run}", "resume=true"], cwd=tmp_path
    )
    assert resumed.returncode == 0 and "already finished" in resumed.stdout + resumed.stderr
