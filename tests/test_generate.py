"""`gptnano generate`, used as a user uses it: streamed text from a checkpoint, the
checkpoint's sampling settings as defaults, and an interactive session driven
through a real pseudo-terminal (typed prompts, Ctrl-C, Ctrl-D)."""

import os
import select
import subprocess
import sys
import time
from pathlib import Path

if sys.platform != "win32":
    import pty  # the interactive session is driven through a POSIX pseudo-terminal

import pytest
import torch

from gptnano.checkpoint import load_net
from gptnano.sampling import generate, stream
from tests.helpers import TINY_GPT, make_text, posix_only, run_cli, scrambled

SAMPLE = ["--model.max_new_tokens", "25", "--model.temperature", "0"]  # the checkpoint's settings: greedy, 25


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A GPT trained for 5 steps on a tiny text, saved with the sampling settings above."""
    folder = tmp_path_factory.mktemp("trained")
    text = folder / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    run_cli(["fit", *TINY_GPT, *SAMPLE, "--data.path", str(text), "--trainer.max_steps", "5"], folder)
    return folder / "checkpoints" / "gpt" / "last.ckpt"


def generate_cli(ckpt: Path, *args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_cli(["generate", "--ckpt_path", str(ckpt), *args], cwd, **kwargs)


def test_stream_yields_the_tokens_generate_returns():
    torch.manual_seed(0)
    from gptnano.models.gpt import GPT

    net = scrambled(GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    idx = torch.tensor([[1, 2, 3]])
    whole = generate(net, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    tokens = list(stream(net, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(5)))
    assert len(tokens) == 20 and all(t.shape == (1, 1) for t in tokens)
    assert torch.equal(torch.cat([idx, *tokens], dim=1), whole)


def test_defaults_come_from_the_checkpoint(ckpt, tmp_path):
    """Trained with 25 greedy tokens: generate writes exactly that, the same as the batch path."""
    out = generate_cli(ckpt, "--prompt", "ROMEO:", cwd=tmp_path).stdout
    net, tokenizer, _ = load_net(ckpt)
    greedy = generate(net, tokenizer.encode("ROMEO:")[None, :], 25, temperature=0)
    assert out == tokenizer.decode(greedy[0].tolist()) + "\n"


def test_same_seed_same_text_as_predict(ckpt, tmp_path):
    """Sampled (not greedy) text: a seed repeats it, and predict with that sample_seed writes the same."""
    args = ["--prompt", "JULIET:", "--temperature", "1.0", "--max_new_tokens", "40"]
    first = generate_cli(ckpt, *args, "--seed", "7", cwd=tmp_path).stdout
    again = generate_cli(ckpt, *args, "--seed", "7", cwd=tmp_path).stdout
    other = generate_cli(ckpt, *args, "--seed", "8", cwd=tmp_path).stdout
    assert first == again != other and first.startswith("JULIET:") and len(first) == len("JULIET:") + 40 + 1
    predicted = run_cli(["predict", "--ckpt_path", str(ckpt), "--data.prompt", "JULIET:", "--model.temperature", "1.0",
                         "--model.max_new_tokens", "40", "--model.sample_seed", "7"], tmp_path).stdout
    assert predicted == first


def test_prompt_file_and_one_line_errors(ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING HENRY:\nThe", encoding="utf-8")
    out = generate_cli(ckpt, "--prompt_file", str(prompt), cwd=tmp_path).stdout
    assert out.startswith("KING HENRY:\nThe") and len(out) == len("KING HENRY:\nThe") + 25 + 1
    for args, says in [(["--prompt", "ROMEO€"], "'€'"),
                       (["--prompt_file", str(tmp_path / "missing.txt")], "prompt file not found"),
                       (["--top_p", "1.5"], "top_p"),
                       (["--device", "nonsense"], "--device nonsense")]:
        bad = generate_cli(ckpt, *args, cwd=tmp_path, check=False)
        assert bad.returncode == 2 and bad.stdout == "", (args, bad.stderr)
        assert bad.stderr.startswith("gptnano: error:") and says in bad.stderr and len(bad.stderr.splitlines()) == 1
    missing = generate_cli(tmp_path / "nothing.ckpt", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr


def test_interactive_from_a_pipe_stops_at_an_empty_line(ckpt, tmp_path):
    """Lines in, one continuation per line out; a bad line is reported and the loop goes on."""
    proc = subprocess.run([sys.executable, "-m", "gptnano", "generate", "--ckpt_path", str(ckpt), "--interactive"],
                          input="ROMEO:\nBAD €\nKING:\n\nnever sampled\n", capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    samples = [line for line in lines if line.startswith(("ROMEO:", "KING:"))]
    assert [s.split(":")[0] for s in samples] == ["ROMEO", "KING"]
    assert "never" not in proc.stdout
    assert "'€'" in proc.stderr and "Traceback" not in proc.stderr


class Terminal:
    """The user's side of a pseudo-terminal running one process."""

    def __init__(self, argv: list[str], cwd: Path):
        env = {k: v for k, v in os.environ.items() if k != "GPTNANO_DATA"}
        env["TERM"] = "dumb"  # readline then draws no colours or cursor moves
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader whose controlling terminal is the pty
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        self.seen = ""

    def _read(self, deadline: float, waiting_for: str) -> None:
        assert time.time() < deadline, f"timed out waiting for {waiting_for}; the terminal shows:\n{self.seen}"
        if select.select([self.fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child has exited and closed its end
                chunk = b""
            assert chunk, f"the process ended before {waiting_for}; the terminal shows:\n{self.seen}"
            self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def read_until(self, marker: str, after: int = 0, timeout: float = 120) -> int:
        """Read until ``marker`` shows at or after position ``after``; return where it ends."""
        deadline = time.time() + timeout
        while (found := self.seen.find(marker, after)) < 0:
            self._read(deadline, repr(marker))
        return found + len(marker)

    def read_chars(self, n: int, after: int, timeout: float = 120) -> str:
        """Read until ``n`` characters have arrived after position ``after``; return them."""
        deadline = time.time() + timeout
        while len(self.seen) < after + n:
            self._read(deadline, f"{n} characters")
        return self.seen[after:after + n]

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining the terminal so the child never blocks on a full buffer
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout} s; the terminal shows:\n{self.seen}")


@posix_only("drives a pseudo-terminal (pty.fork), which Windows does not have")
def test_interactive_session_in_a_terminal(ckpt, tmp_path):
    """Type a prompt, watch text stream in, press Ctrl-C mid-sample: the sample stops, the
    loop asks again; a second prompt streams too; Ctrl-D quits with status 0."""
    term = Terminal([sys.executable, "-m", "gptnano", "generate", "--ckpt_path", str(ckpt), "--interactive",
                     "--max_new_tokens", "1000000", "--temperature", "1.0"], tmp_path)
    vocab = set(load_net(ckpt).tokenizer.vocab)
    at = term.read_until("> ")
    for prompt in ("ROMEO:", "JULIET:"):
        term.type(prompt.encode() + b"\r")
        start = term.read_until(prompt + "\n" + prompt, at)  # the echo of the typed line, then the sample
        # Streaming: text arrives while the million-token sample is still far from done.
        assert set(term.read_chars(200, start)) <= vocab
        term.type(b"\x03")  # Ctrl-C, as the terminal sends it: SIGINT to the foreground process
        at = term.read_until("> ", term.read_until("[stopped]", start))
    term.type(b"\x04")  # Ctrl-D on an empty line
    assert term.exit_status() == 0, term.seen
    assert "Traceback" not in term.seen and "KeyboardInterrupt" not in term.seen
