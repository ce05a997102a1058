"""The one command line (`higgs-lora <verb>`), the start-up helper and the `[stage]` log lines."""

import argparse
import importlib
import logging
import os
import subprocess
import sys

import pytest

from higgs_lora import cli, startup
from higgs_lora.errors import CheckpointError, UserError
from higgs_lora.logs import get_logger, is_quiet, setup_logging


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_names_a_module_with_a_main(verb):
    module = importlib.import_module(cli.VERBS[verb][0])
    assert callable(module.main)


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's --help and the like
        return stop.code or 0


def test_a_verb_runs_the_same_main_as_the_module_form(capsys):
    assert exit_code(cli.main, ["config", "--help-keys"]) == 0
    by_verb = capsys.readouterr().out
    from higgs_lora.config.help import main as config_main

    assert exit_code(config_main, ["--help-keys"]) == 0
    assert capsys.readouterr().out == by_verb
    assert "train.micro_batch_tokens" in by_verb


def test_unknown_verb_and_no_verb_are_usage_errors(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'trian'" in err and "prepare" in err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "deepspeed launch/train.py" in capsys.readouterr().out


def test_python_dash_m_higgs_lora_is_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "higgs_lora", "config", "--help-keys"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "train.micro_batch_tokens" in done.stdout


def test_run_command_turns_a_user_error_into_exit_2_and_keeps_other_errors(capsys):
    def bad():
        raise CheckpointError("/models/x is not a model directory; give model.path=DIR")

    assert startup.run_command(None, bad) == 2
    assert capsys.readouterr().err == "error: /models/x is not a model directory; give model.path=DIR\n"
    assert startup.run_command(None, lambda: None) == 0
    assert startup.run_command(None, lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):
        startup.run_command(None, lambda: 1 / 0)


def test_every_stage_error_is_a_user_error():
    from higgs_lora.config import ConfigError
    from higgs_lora.data.cache import CacheError
    from higgs_lora.data.sampler import DataError
    from higgs_lora.plan import PlanError
    from higgs_lora.train.checkpoint import ResumeError

    for error in (ConfigError, CacheError, DataError, PlanError, ResumeError, CheckpointError):
        assert issubclass(error, UserError), error


def test_start_sets_the_offline_switches_without_overriding_the_user(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    startup.start(None)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_stage_lines_go_to_stdout_and_warnings_to_stderr(capsys):
    setup_logging()
    log = get_logger("prepare")
    log.info("120 utterances kept")
    log.warning("3 files unreadable")
    log.debug("not shown")
    out, err = capsys.readouterr()
    assert out == "[prepare] 120 utterances kept\n"
    assert err == "[prepare] warning: 3 files unreadable\n"


def test_quiet_and_verbose_set_the_level(capsys):
    parser = argparse.ArgumentParser()
    startup.add_common_arguments(parser)
    try:
        startup.start(parser.parse_args(["--quiet"]))
        assert is_quiet()
        get_logger("infer").info("hidden")
        startup.start(parser.parse_args(["-v"]))
        get_logger("infer").debug("shown")
        assert capsys.readouterr().out == "[infer] shown\n"
    finally:
        setup_logging()
    assert logging.getLogger("higgs_lora").level == logging.INFO
    with pytest.raises(SystemExit):
        parser.parse_args(["--quiet", "--verbose"])


def test_a_nested_quiet_command_leaves_the_callers_verbosity(capsys):
    setup_logging()
    parser = argparse.ArgumentParser()
    startup.add_common_arguments(parser)
    assert startup.run_command(parser.parse_args(["--quiet"]), lambda: get_logger("infer").info("hidden")) == 0
    get_logger("demo").info("still speaking")
    assert capsys.readouterr().out == "[demo] still speaking\n"
