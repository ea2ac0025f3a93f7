"""`gptnano generate`: watch a trained model write.

Each character goes to the terminal as soon as it is sampled. Only the
checkpoint is needed (read through gptnano.checkpoint.load_net, which runs no
code from the file), and Lightning is never imported, so it starts in about
the time of ``import torch``. With --interactive it is a prompt loop: type a
prompt and press Enter to watch the continuation; Ctrl-C stops a sample and
returns to the prompt; an empty line, Ctrl-D or Ctrl-C at the prompt quits.

    gptnano generate --ckpt_path checkpoints/gpt/best.ckpt --prompt "ROMEO:"
    gptnano generate --ckpt_path checkpoints/gpt/best.ckpt --interactive

Sampling settings default to the checkpoint's (``--model.temperature`` etc. at
training time). `gptnano predict` is the batch way: many prompts, DDP, a file.
"""

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from gptnano.errors import UserError

# torch is imported inside the functions that need it, so that --help and mistyped options
# answer at once instead of after the second or more that importing torch takes.

SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
HPARAM = {"seed": "sample_seed"}  # the checkpoint's name for a setting, where it differs


def optional(kind):
    """An argparse type that also accepts "none" (no top-k cut, no nucleus, no fixed seed)."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptnano generate", description=__doc__.split("\n\n    ")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)  # unset settings come from the checkpoint
    ap.add_argument("--ckpt_path", required=True,
                    help="a checkpoint written by gptnano fit, or a folder written by gptnano export")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text to continue (default: a newline, or the vocabulary's first "
                        "character when the model's text has none)")
    source.add_argument("--prompt_file", help="a UTF-8 file whose whole content is the prompt (at most 1 MB; "
                        "Windows line ends become newlines when the model knows no \\r)")
    ap.add_argument("--max_new_tokens", type=int, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, help="0 picks the most likely token (greedy)")
    ap.add_argument("--top_k", type=optional(int), help="sample among the k most likely tokens (none: all)")
    ap.add_argument("--top_p", type=optional(float), help="sample from the smallest set of tokens whose "
                    "probability adds up to top_p (none: all)")
    ap.add_argument("--seed", type=optional(int), help="seed of the sampler, for repeatable text (none: a new one)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: where this model "
                    "generates faster, measured once per machine and model when there is a GPU (default: auto)")
    ap.add_argument("--interactive", action="store_true", default=False,
                    help="a prompt loop: type a prompt, watch the continuation")
    return ap


PROBE_TOKENS = 32  # generated per timed step when --device auto measures


def pick_device(name: str, net=None):
    """The device to generate on. ``auto``: as ``fit`` chooses (gptnano/devices.py): the CPU where
    there is no GPU, else whichever of the two generates with ``net`` faster, measured on a few
    short samples and remembered per machine and model, said in one line."""
    import torch

    if name == "auto":
        from gptnano import devices

        choice = devices.choose(devices.work_of("generate", net), lambda device: sampling_step(net, device),
                                PROBE_TOKENS)
        if choice.why:
            print(devices.line(choice, "--device"), file=sys.stderr)
        return torch.device(choice.device)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (cpu, cuda, cuda:N, mps, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available() or device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: there is no {device.type} device here")
    return device


def sampling_step(net, device: str):
    """``PROBE_TOKENS`` greedy tokens from a copy of ``net`` on ``device``, each read back as the
    writer reads it: what ``--device auto`` times."""
    import copy

    import torch

    from gptnano.sampling import stream

    model = copy.deepcopy(net).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    return lambda: [token.item() for token in stream(model, prompt, PROBE_TOKENS, temperature=0)]


def read_prompt(args, tokenizer) -> str:
    """The prompt given (``as_prompt``: as the model can take it), or the default prompt."""
    from gptnano.data.tokenizer import as_prompt, default_prompt

    if "prompt_file" in args:
        from gptnano.data.text import read_text  # the data module's own reader: the same one-line errors

        prompt = as_prompt(read_text(Path(args.prompt_file), "prompt file"), tokenizer)
    else:
        prompt = as_prompt(args.prompt, tokenizer) if "prompt" in args else default_prompt(tokenizer)
    if not prompt:
        raise UserError("the prompt is empty: give the model some text to continue")
    return prompt


@contextmanager
def ctrl_c_stops():
    """While sampling, Ctrl-C sets the yielded event instead of raising KeyboardInterrupt
    wherever the program happens to be: the sample then ends cleanly after its current token."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class Writer:
    """Writes samples of one loaded model to ``out`` a character at a time."""

    def __init__(self, net, tokenizer, settings: dict, device, out=None):
        import torch

        self.net, self.tokenizer, self.settings, self.device = net, tokenizer, settings, device
        self.out = out or sys.stdout  # the stdout of the moment: a default argument would keep the first one forever
        # One generator for the session: every sample draws on from where the last one stopped,
        # so a seeded session repeats exactly. Without a seed it takes a fresh one, recorded in
        # the settings so the interactive banner can show how to repeat the session.
        self.generator = torch.Generator(device=device)
        if settings["seed"] is None:
            settings["seed"] = self.generator.seed()
        else:
            self.generator.manual_seed(settings["seed"])

    def sample(self, prompt: str) -> bool:
        """Print ``prompt``, then each new character as soon as it is drawn; False if Ctrl-C stopped it."""
        from gptnano.sampling import stream

        s = self.settings
        idx = self.tokenizer.encode(prompt)[None, :].to(self.device)  # a UserError names unknown characters
        feed = self.tokenizer.stream_decoder()  # holds back a character until all its tokens are in
        self.out.write(prompt)
        self.out.flush()
        with ctrl_c_stops() as stopped:
            tokens = stream(self.net, idx, s["max_new_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                            top_p=s["top_p"], generator=self.generator)
            for token in tokens:
                self.out.write(feed(token[0].tolist()))
                self.out.flush()
                if stopped.is_set():
                    break
        self.out.write("\n")
        self.out.flush()
        return not stopped.is_set()


def interact(writer: Writer, described: str, first: str | None = None) -> None:
    """The prompt loop of --interactive: one sample per line typed (``first``, from --prompt
    or --prompt_file, is sampled before the first line is read)."""
    try:
        import readline  # noqa: F401  line editing and history for input(), where the platform has it
    except ImportError:
        pass
    from gptnano.data.tokenizer import as_prompt

    tty = sys.stdin.isatty()
    s = writer.settings
    print(f"{described}; {s['max_new_tokens']} tokens per prompt, temperature {s['temperature']}, "
          f"top_k {s['top_k']}, top_p {s['top_p']}, seed {s['seed']}\n"
          "Type a prompt and press Enter. Ctrl-C stops a sample; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            prompt = first or input("> " if tty else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            print(file=sys.stderr)
            return
        first = None
        if not prompt:
            return
        prompt = as_prompt(prompt, writer.tokenizer)
        try:
            if not writer.sample(prompt):
                print("[stopped]", file=sys.stderr)
        except UserError as e:  # e.g. characters the model has never seen: say so, keep the loop
            print(f"gptnano: {e}", file=sys.stderr)


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)  # before torch is imported: --help and typos answer at once
    import torch

    from gptnano.checkpoint import load_net
    from gptnano.sampling import check_settings

    net, tokenizer, hparams = load_net(args.ckpt_path)
    settings = {name: getattr(args, name, hparams.get(HPARAM.get(name, name))) for name in SETTINGS}
    check_settings(settings["max_new_tokens"], settings["temperature"], settings["top_k"], settings["top_p"])
    given = "prompt" in args or "prompt_file" in args
    prompt = read_prompt(args, tokenizer) if given or not args.interactive else None
    if "OMP_NUM_THREADS" not in os.environ:
        # On the CPU a token is a chain of small operations that more threads only split into waits
        # (docs/generate.md). Set before --device auto times the CPU, so that it times what
        # generating here would do.
        torch.set_num_threads(1)
    device = pick_device(args.device, net)
    writer = Writer(net.to(device), tokenizer, settings, device)
    try:
        if args.interactive:
            params = sum(p.numel() for p in net.parameters())
            interact(writer, f"{type(net).__name__} ({params:,} parameters, {len(tokenizer)} tokens) "
                             f"on {device}", first=prompt)
        elif not writer.sample(prompt):
            raise KeyboardInterrupt  # stopped by Ctrl-C: exit status 130, like any interrupted command
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
