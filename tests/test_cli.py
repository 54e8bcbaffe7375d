"""The `runner` command line as a user meets it: help with defaults and choices, suggestions, completion,
--version, environment variables, --print-config, one-line errors. Real console script in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import runner
from runner import config

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(sys.executable).with_name("runner")


def cli(*args: str, env: dict[str, str] | None = None, module: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `runner` script (or `python -m MODULE`), with no RUNNER_* variables but those given."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    full_env.update(COLUMNS="250", **(env or {}))
    command = [sys.executable, "-m", module] if module else [str(RUNNER)]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120)


def one_line_usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("runner: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_train_help_shows_every_default_choice_and_env_var() -> None:
    out = cli("train", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.replace("│", " ").split())  # rich's table, as words
    for flag, choices in [("--viz", config.VIZ), ("--optimizer", config.OPTIMIZERS), ("--device", config.DEVICES),
                          ("--strategy", config.STRATEGIES), ("--task", (*config.TASKS, "MODULE:FACTORY")),
                          ("--oom", config.ON_OOM), ("--on-nan", config.ON_NAN),
                          ("--worker-start-method", config.START_METHODS)]:
        assert f"{flag} [{'|'.join(choices)}]" in text, flag
    defaults = config.TrainConfig()
    for flag, field in [("--viz", "viz"), ("--lr", "lr"), ("--log-every", "log_every"), ("--model", "model"),
                        ("--batch-size", "batch_size"), ("--visdom-port", "visdom_port"), ("--run-dir", "run_dir")]:
        entry = text[text.index(f"{flag} "):]
        assert re.match(rf"{flag} .*?\[default: \({re.escape(str(getattr(defaults, field)))}\)\]", entry), flag
    for variable in ("RUNNER_RUN_DIR", "RUNNER_VIZ", "RUNNER_VISDOM_URL", "RUNNER_VISDOM_PORT", "RUNNER_WORKERS",
                     "RUNNER_DEVICE"):
        assert f"[env var: {variable}]" in text, variable
    assert "--print-config" in text and "--experiment NAME" in text


def test_misspelt_choice_is_one_line_with_a_suggestion() -> None:
    err = one_line_usage_error(cli("train", "--viz", "visdmo"))
    assert "did you mean 'visdom'?" in err and "--viz" in err
    err = one_line_usage_error(cli("train", "--print-config", env={"RUNNER_VIZ": "tensorbord"}))
    assert "RUNNER_VIZ" in err and "did you mean 'tensorboard'?" in err


def test_misspelt_choice_in_a_config_file_suggests_too(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[train]\noptimizer = "adamm"\n')
    err = one_line_usage_error(cli("train", "--config", str(path), "--print-config"))
    assert "unknown optimizer 'adamm': did you mean 'adam'?" in err


def test_misspelt_command_and_option_suggest() -> None:
    assert "Did you mean 'train'?" in one_line_usage_error(cli("trian"))
    assert "--viz" in one_line_usage_error(cli("train", "--vizz", "none"))
    assert "'--steps'" in one_line_usage_error(cli("train", "--steps", "many"))


def test_version() -> None:
    out = cli("--version")
    assert (out.returncode, out.stdout) == (0, f"runner {runner.__version__}\n")


def test_no_command_shows_the_help() -> None:
    out = cli()
    assert out.returncode == 0 and "train" in out.stdout and "cleanup" in out.stdout


def test_completion_script_and_completions() -> None:
    # typer detects the shell the command runs in (as in a terminal): a bash that stays the parent
    script = subprocess.run(["bash", "-c", f"{RUNNER} --show-completion; exit $?"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert script.returncode == 0, script.stderr
    assert "_RUNNER_COMPLETE=complete_bash" in script.stdout and "complete -o default -F" in script.stdout

    def complete(words: str, index: int) -> list[str]:
        out = cli(env={"_RUNNER_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(index)})
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("runner tr", 1) == ["train"]
    assert complete("runner train --viz ", 3) == list(config.VIZ)
    assert complete("runner train --optimizer adam", 3) == ["adam", "adamw"]


def test_print_config_runs_nothing_and_round_trips(tmp_path: Path) -> None:
    name = 'quote " and \\ back\\slash, ünïcödé 名前 \'single\''
    out = cli("train", "--print-config", "--model", "mlp", "--name", name, "--data", 'imagefolder:/a "b"/c',
              "--run-dir", str(tmp_path / "runs"), "--batch-size", "auto", "--experiment", "exp-1")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "runs").exists()
    printed = tomllib.loads(out.stdout)["train"]
    assert (printed["name"], printed["data"], printed["batch_size"]) == (name, 'imagefolder:/a "b"/c', "auto")
    (tmp_path / "c.toml").write_text(out.stdout, encoding="utf-8")
    again = cli("train", "--config", str(tmp_path / "c.toml"), "--print-config")
    assert (again.returncode, again.stdout) == (0, out.stdout)
    trainer = cli("--config", str(tmp_path / "c.toml"), "--print-config", module="runner.train")
    assert (trainer.returncode, trainer.stdout) == (0, out.stdout)
    assert config.resolve(str(tmp_path / "c.toml"), {}) == config.TrainConfig(**printed)


def test_flags_and_env_vars_override_the_file_only_when_given(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[train]\nmodel = "mlp"\nlr = 0.5\nviz = "visdom"\nrun_dir = "from-file"\nworkers = 3\n')

    def resolved(*args: str, env: dict[str, str] | None = None) -> dict:
        out = cli("train", "--config", str(path), "--print-config", *args, env=env)
        assert out.returncode == 0, out.stderr
        return tomllib.loads(out.stdout)["train"]

    base = resolved()
    assert (base["model"], base["lr"], base["viz"], base["run_dir"], base["workers"]) == ("mlp", 0.5, "visdom",
                                                                                           "from-file", 3)
    assert base["steps"] == config.TrainConfig().steps
    flagged = resolved("--lr", "0.1")
    assert (flagged["lr"], flagged["viz"], flagged["model"]) == (0.1, "visdom", "mlp")
    env = {"RUNNER_VIZ": "none", "RUNNER_RUN_DIR": str(tmp_path), "RUNNER_WORKERS": "0"}
    from_env = resolved(env=env)
    assert (from_env["viz"], from_env["run_dir"], from_env["workers"]) == ("none", str(tmp_path), 0)
    assert from_env["lr"] == 0.5
    assert resolved("--viz", "both", env=env)["viz"] == "both"


def test_the_trainer_keeps_what_runner_train_resolved(tmp_path: Path) -> None:
    """`runner train` resolves flags over env vars; its trainer child (`python -m runner.train --config`)
    must not let the same env vars override that again."""
    env = {"RUNNER_VIZ": "visdom", "RUNNER_WORKERS": "2", "RUNNER_VISDOM_URL": "http://127.0.0.1:9"}
    out = cli("train", "--model", "mlp", "--steps", "1", "--image-size", "16", "--batch-size", "4", "--samples", "8",
              "--viz", "none", "--workers", "0", "--no-progress", "--run-dir", str(tmp_path), "--name", "r", env=env)
    assert out.returncode == 0, out.stderr
    saved = tomllib.loads((tmp_path / "r" / "config.toml").read_text(encoding="utf-8"))["train"]
    assert (saved["viz"], saved["workers"], saved["visdom_url"]) == ("none", 0, "http://127.0.0.1:9")
    printed = cli("--config", str(tmp_path / "r" / "config.toml"), "--print-config", module="runner.train", env=env)
    assert tomllib.loads(printed.stdout)["train"] == saved


@pytest.mark.parametrize("name", ["line\nbreak", "tab\there", "bell\x07", "del\x7f"])
def test_control_characters_in_a_name_are_one_line_errors(name: str) -> None:
    err = one_line_usage_error(cli("train", "--name", name, "--print-config"))
    assert "name must not contain control characters" in err


def test_trainer_entry_point_reports_usage_errors_in_one_line() -> None:
    err = one_line_usage_error(cli("--bogus", module="runner.train"))
    assert "--bogus" in err and "python -m runner.train --help" in err


def test_dashboards_read_the_run_dir_from_the_environment(tmp_path: Path) -> None:
    out = cli("dashboards", "status", env={"RUNNER_RUN_DIR": str(tmp_path)})
    assert out.returncode == 1 and f"no dashboards recorded for {tmp_path}" in out.stdout


def test_commands_stand_below_the_cli_without_torch() -> None:
    """No import circle: the command modules and the trainer's entry point never load runner.cli (nor torch)."""
    code = ("import sys, importlib\n"
            "for name in ('runner.train.__main__', 'runner.memory.commands', 'runner.procs.commands',"
            " 'dashboards.commands', 'runner.diagnosis.report_command', 'runner.train_command', 'runner.cli_errors'):\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in ('runner.cli', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_no_private_typer_or_click_imports() -> None:
    """Typer vendors click since 0.26 (typer._click is private there) and depended on it before: use typer only."""
    pattern = re.compile(r"^\s*(from|import)\s+(click\b|typer\._)|typer\._click", re.MULTILINE)
    offenders = [str(path.relative_to(ROOT)) for folder in ("runner", "dashboards", "scripts")
                 for path in (ROOT / folder).rglob("*.py") if pattern.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_no_import_circles_among_the_projects_modules() -> None:
    """Data flows one way (CLI → config → launch → trainer → hub → sinks): no module imports, even lazily
    inside a function, a module that imports it back, directly or through others."""
    import ast

    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for folder in ("runner", "dashboards") for path in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from runner import config` depends on runner.config, as `from runner.config import X` does
                # (the package's __init__ runs for every submodule import alike)
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [node.module]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert circles == []
