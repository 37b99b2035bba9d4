"""Both console scripts: every subcommand is wired, explains itself, and errors tell the fix."""

import importlib
import subprocess
import sys

import pytest

from stream_asd.cli import COMMANDS as RUNTIME_COMMANDS
from trainer.cli import COMMANDS as TRAINER_COMMANDS

ALL = [("stream_asd.cli", name, mod) for name, (mod, _) in RUNTIME_COMMANDS.items()] + \
      [("trainer.cli", name, mod) for name, (mod, _) in TRAINER_COMMANDS.items()]


@pytest.mark.parametrize("entry, name, module", ALL, ids=[f"{e.split('.')[0]}-{n}" for e, n, _ in ALL])
def test_every_subcommand_has_help(entry, name, module, capsys):
    mod = importlib.import_module(module)
    assert callable(mod.add_arguments) and callable(mod.run)
    main = importlib.import_module(entry).main
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage:" in out and name in out


def test_top_level_help_lists_commands():
    for script, commands in (("stream_asd.cli", RUNTIME_COMMANDS), ("trainer.cli", TRAINER_COMMANDS)):
        out = subprocess.run([sys.executable, "-m", script, "--help"], capture_output=True, text=True, check=True).stdout
        for name in commands:
            assert name in out


def test_runtime_never_imports_trainer():
    # The bundle is the only contract between training and serving.
    code = ("import sys, importlib, pkgutil, stream_asd\n"
            "for m in pkgutil.walk_packages(stream_asd.__path__, 'stream_asd.'):\n"
            "    if m.name.endswith('__main__'): continue\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k == 'trainer' or k.startswith('trainer.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_subcommand_prints_help_and_fails(capsys):
    from stream_asd.cli import main
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
