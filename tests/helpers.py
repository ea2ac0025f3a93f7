"""Helpers the tests share: a small made-up text (tests never need the real corpus), a tiny
GPT's command-line settings, and running the real `gptnano` command in a fresh folder.
Fixtures live in conftest.py; everything a test imports lives here."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

WORDS = "the king queen my lord good sir thou art what say you come hither night day love death and of to".split()


def make_text(n_chars: int = 20_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < n_chars:
        speaker = rng.choice(["ROMEO", "JULIET", "KING HENRY"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(f"{speaker}:\n{words.capitalize()}{rng.choice('.,!?')}\n\n")
    return "".join(lines)[:n_chars]


def scrambled(model):
    """Weights drawn far from their near-zero init, so a mistake shows up as a large
    difference instead of hiding under tiny logits; returned in eval mode."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def random_tokens(vocab: int, B: int, T: int, seed: int = 1):
    import torch

    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# A model small enough that a CLI round trip takes seconds.
TINY_GPT = [
    "--model.net", "GPT",
    "--model.net.block_size", "16", "--model.net.n_layer", "1",
    "--model.net.n_head", "2", "--model.net.n_embd", "16",
    "--data.batch_size", "4", "--data.eval_batch_size", "256",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def terminal_signals() -> None:
    """``preexec_fn`` of a child that must get SIGHUP and SIGINT as a terminal's job does: by default,
    whatever this runner inherited (a suite started under nohup or in a shell's background ignores
    them). POSIX only, as ``preexec_fn`` is."""
    import signal

    for sig in (signal.SIGHUP, signal.SIGINT):  # after exec, a new Python turns SIGINT's default into Ctrl-C
        signal.signal(sig, signal.SIG_DFL)


def cli_env(env_extra: dict | None = None) -> dict:
    """The environment of a `gptnano` subprocess (``env_extra`` on top; None unsets): no GPTNANO_DATA from the outside, and
    every process of a test training in the same precision: the machine's verdict, measured
    once here (a probe in each process could differ on a busy machine, e.g. between the two
    halves of a resume test; tests/test_hardware.py tests the probe's decisions themselves)."""
    from gptnano.hardware import FAST_BF16_ENV, bf16_verdict

    env = {k: v for k, v in os.environ.items() if k != "GPTNANO_DATA"}
    env[FAST_BF16_ENV] = env.get(FAST_BF16_ENV) or ("1" if bf16_verdict("cpu").fast else "0")
    env.update(env_extra or {})
    return {k: v for k, v in env.items() if v is not None}  # None in env_extra: a variable left unset


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env_extra: dict | None = None, check: bool = True):
    """Run `python -m gptnano ARGS` in ``cwd``; return the CompletedProcess."""
    env = cli_env(env_extra)
    proc = subprocess.run([sys.executable, "-m", "gptnano", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptnano {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def fit_in_process(folder: Path, text: str, args: list[str], name: str = "tiny.txt") -> Path:
    """Write ``text`` (str, or bytes as they are) to ``folder/name`` and run ``gptnano fit <args>
    --data.path <name>`` in this process from ``folder`` (cheaper than a new process, for
    module-scoped runs that several tests read). Returns ``folder``."""
    from gptnano.cli.main import main

    path = folder / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        main(["fit", *args, "--data.path", name])
    finally:
        os.chdir(cwd)
    return folder


# `python -c WITHOUT_UNIX ARGS` runs `gptnano ARGS` as on an OS without the Unix-only pieces
# (Windows): no os.pread, no fcntl (filelock then takes its portable lock), and no signal
# to itself. It says so on stderr first, so a test can check the pieces really were missing.
WITHOUT_UNIX = """
import os, signal, sys
sys.modules["fcntl"] = None  # `import fcntl` now fails, as on Windows
del os.pread
own_pid, real_kill = os.getpid(), os.kill

def kill(pid, sig):
    if pid in (own_pid, 0):
        raise OSError("no signals to oneself here: on Windows SIGTERM would kill the process at once")
    return real_kill(pid, sig)

os.kill = kill
signal.raise_signal = lambda sig: kill(own_pid, sig)
import filelock
print("without: os.pread fcntl self-signals; lock " + filelock.FileLock.__name__, file=sys.stderr)
from gptnano.cli.main import main
main(sys.argv[1:])
"""


def start_cli(args: list[str], cwd: Path, env_extra: dict | None = None, launcher: str | None = None):
    """Start `python -m gptnano ARGS` (or `python -c LAUNCHER ARGS`) in ``cwd``; return the Popen."""
    head = ["-c", launcher] if launcher else ["-m", "gptnano"]
    return subprocess.Popen([sys.executable, *head, *args], cwd=cwd, env=cli_env(env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=terminal_signals if os.name == "posix" else None)


def wait_for(path: Path, proc, timeout: float = 120) -> None:
    """Wait until ``path`` exists; fail if ``proc`` ends first or ``timeout`` s pass."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no {path.name} appeared"
        time.sleep(0.05)


def posix_only(why: str):
    """The one skip the suite allows: a test of POSIX-only behaviour, skipped on Windows, saying
    why (the README lists them). Everything else runs everywhere."""
    import pytest

    return pytest.mark.skipif(sys.platform == "win32", reason=f"POSIX only: {why}")


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
