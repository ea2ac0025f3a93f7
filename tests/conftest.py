"""Fixtures, and the two layers of the suite.

Fast unit tests, and slower end-to-end tests: those that start a `gptnano` process, run
the command in-process, or run a Lightning Trainer. The end-to-end ones are marked ``e2e``
automatically (``pytest_collection_modifyitems`` below), so ``python -m pytest -m "not e2e"``
runs the fast layer alone; the README's command runs both. Shared helpers are in
tests/helpers.py.
"""

import inspect
import logging
import os
import sys
import types
from pathlib import Path

import pytest

from tests.helpers import Ran, cli_env, make_text

# What makes a test end-to-end: it, a fixture it uses, or a function of the tests it calls
# reaches one of these names.
END_TO_END = {"run_cli", "gptnano", "GPTNanoCLI", "Trainer", "subprocess", "Popen", "_start_fit", "spawn"}


def _reaches(obj, names: set[str], seen: set) -> bool:
    """Whether a test function (or fixture) refers to one of ``names``, directly or through the
    functions of the tests' own modules it calls."""
    code = getattr(obj, "__code__", None)
    if code is None or id(code) in seen:
        return False
    seen.add(id(code))
    found = set(code.co_names) | set(code.co_varnames)
    found |= {n for const in code.co_consts if isinstance(const, types.CodeType)
              for n in (*const.co_names, *const.co_varnames)}
    if found & names:
        return True
    module = inspect.getmodule(obj)
    for name in found:
        target = getattr(module, name, None)
        if inspect.isfunction(target) and target.__module__.startswith("tests.") and _reaches(target, names, seen):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if "gptnano" in item.fixturenames or any(_reaches(f, END_TO_END, set())
                                                  for f in [item.function, *fixtures]):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are tiny, so a second thread buys nothing; on a busy machine it
    costs milliseconds per operation waiting for the other thread to be scheduled."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def device_verdicts_in_a_temporary_folder(tmp_path_factory):
    """Device choices are remembered in a per-user cache folder: the tests' own go to a
    temporary one (every gptnano process a test starts inherits it)."""
    from gptnano.files import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture(autouse=True)
def no_leaked_hardware_choice():
    """The CLI records its bf16 verdict and its device choice in the environment for the DDP
    processes it launches; in-process tests must not hand one test's verdict (or stub) to the next."""
    from gptnano.devices import DEVICE_ENV
    from gptnano.hardware import FAST_BF16_ENV, bf16_verdict

    before = {key: os.environ.get(key) for key in (FAST_BF16_ENV, DEVICE_ENV)}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    bf16_verdict.cache_clear()


@pytest.fixture
def gptnano(monkeypatch, capsys):
    """``gptnano(args, cwd)`` runs the command in this process, as the console script would
    (gptnano.cli.main.main), and returns its exit status and output. For the tests of
    mistakes, which stop before training: a new process would pay ~4 s of importing
    Lightning for each one. An exception escaping main fails the test, as a traceback would."""
    from gptnano.cli.main import main

    def run(args: list[str], cwd: Path, env_extra: dict | None = None) -> Ran:
        monkeypatch.chdir(cwd)
        for key in set(os.environ) - set(cli_env(env_extra)):
            monkeypatch.delenv(key)
        for key, value in cli_env(env_extra).items():
            monkeypatch.setenv(key, value)
        # Lightning's loggers hold the stderr of the moment they were made (another test's
        # captured stream, closed since): point them at this test's.
        for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("lightning")]:
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler:
                    monkeypatch.setattr(handler, "stream", sys.stderr)
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run
