"""Promises about failure: exact resume, crash safety, the NaN guard, safe loading,
and determinism. Each test drives the real `gptnano` command in a subprocess."""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptnano.models import MODELS
from tests.helpers import TINY_GPT, cli_env, posix_only, run_cli

TINY = {
    "gpt": TINY_GPT,
    "rnn": [a if a != "GPT" else "RNN" for a in TINY_GPT if a not in ("--model.net.n_head", "2")],
    "gpt-muon": [*TINY_GPT, "--model.optimizer", "muon"],  # Muon's momentum buffers must resume too
    # The trapezoid and Muon's momentum warmup are functions of the step: the resume at step 9 lands
    # inside both (the cooldown starts at step 8, the momentum reaches 0.95 at step 12).
    "gpt-muon-wsd": [*TINY_GPT, "--model.optimizer", "muon", "--model.lr_schedule", "wsd",
                     "--model.cooldown_fraction", "0.5", "--model.muon_momentum_warmup_steps", "12"],
}
# Both precision paths on any machine: as on a CPU with fast bf16, and as on one without.
FAST_BF16 = {"gpt-muon": "1", "gpt-muon-nobf16": "0"}
TINY["gpt-muon-nobf16"] = TINY["gpt-muon"]


def _train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for events in sorted(run_dir.glob("lightning_logs/*/version_*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


def _state(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {"global_step": ckpt["global_step"], "state_dict": ckpt["state_dict"],
            "optimizer": ckpt["optimizer_states"], "scheduler": ckpt["lr_schedulers"]}


def _assert_equal_state(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


# The GPT with AdamW alone is left out: the RNN's case resumes AdamW's state, the GPT's two Muon cases the GPT.
@pytest.mark.parametrize("arch", [a for a in TINY if a.split("-")[0] in MODELS and a != "gpt"])
def test_resume_is_bit_exact(arch, text_file, tmp_path):
    """N steps in one go == k steps, stop, then --ckpt_path last to N in a new process.

    Dropout is on, and k falls between two validations."""
    common = ["fit", *TINY[arch], "--model.net.dropout", "0.2", "--data.path", str(text_file),
              "--model.lr_decay_steps", "16", "--trainer.val_check_interval", "6",
              "--trainer.log_every_n_steps", "1", "--checkpoint.last_every_n_steps", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    env = {"GPTNANO_FAST_BF16": FAST_BF16[arch]} if arch in FAST_BF16 else None
    run_cli([*common, "--trainer.max_steps", "16"], straight, env_extra=env)
    run_cli([*common, "--trainer.max_steps", "9"], split, env_extra=env)
    run_cli([*common, "--trainer.max_steps", "16", "--ckpt_path", "last"], split, env_extra=env)

    a, b = (_state(d / "checkpoints" / arch.split("-")[0] / "last.ckpt") for d in (straight, split))
    assert a["global_step"] == b["global_step"] == 16
    if arch in FAST_BF16:  # the run trained, and resumed, in the precision chosen for the machine
        meta = torch.load(split / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)["gptnano"]
        fast = FAST_BF16[arch] == "1"
        assert meta["precision"] == ("bf16-mixed" if fast else "32-true")
        assert meta["muon_dtype"] == ("bfloat16" if fast else "float32")
    _assert_equal_state(a, b)
    la, lb = _train_losses(straight), _train_losses(split)
    after = [s for s in la if s >= 9]
    assert after and all(la[s] == lb[s] for s in after), (la, lb)


@pytest.mark.parametrize("accumulate,stop,end", [(1, 42, 50), (1, 45, 50), (4, 13, 16), (4, 11, 16)],
                         ids=["at-an-epoch-end", "mid-second-epoch", "accumulating-mid-second-epoch",
                              "accumulating-at-an-epoch-end"])
def test_resume_is_bit_exact_across_epochs(accumulate, stop, end, tmp_path):
    """Epochs of 42 batches (a 3,000-character text): stopped at an epoch's end or in the middle of the
    second epoch, also accumulating 4 batches a step (11 updates an epoch, the last of 2 batches), a
    resume trains on exactly as the run would have: batches come from the global batch index, which
    no epoch restarts. (Stopped exactly at an epoch's end while accumulating, a resume used to add one
    stray one-batch update: last.ckpt was written after the epoch was counted complete.)"""
    from tests.helpers import make_text

    common = ["fit", *TINY_GPT, "--model.net.dropout", "0.2", "--data.path", "short.txt", "--model.lr_decay_steps",
              str(end), "--trainer.val_check_interval", "1000", "--trainer.accumulate_grad_batches", str(accumulate)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
        (folder / "short.txt").write_text(make_text(3000), encoding="utf-8")
    run_cli([*common, "--trainer.max_steps", str(end)], straight)
    run_cli([*common, "--trainer.max_steps", str(stop)], split)
    run_cli([*common, "--trainer.max_steps", str(end), "--ckpt_path", "last"], split)
    a, b = (_state(d / "checkpoints" / "gpt" / "last.ckpt") for d in (straight, split))
    assert a["global_step"] == b["global_step"] == end
    _assert_equal_state(a, b)


def test_a_run_ended_by_max_epochs_resumes_whole_epochs(tmp_path):
    """Epochs of 7 batches (--trainer.limit_train_batches) validated every 5 steps, so the first epoch
    ends on no validation: ended by max_epochs 1, then resumed with max_epochs 2, the run trains the
    whole second epoch as an unbroken 2-epoch run does. Before, last.ckpt came only from the end of
    training, which Lightning resumed as an epoch with its batches done: the second epoch got 1 step."""
    from tests.helpers import make_text

    common = ["fit", *TINY_GPT, "--data.path", "short.txt", "--model.lr_decay_steps", "14",
              "--trainer.limit_train_batches", "7", "--trainer.val_check_interval", "5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
        (folder / "short.txt").write_text(make_text(3000), encoding="utf-8")
    run_cli([*common, "--trainer.max_epochs", "2"], straight)
    run_cli([*common, "--trainer.max_epochs", "1"], split)
    assert _state(split / "checkpoints" / "gpt" / "last.ckpt")["global_step"] == 7
    run_cli([*common, "--trainer.max_epochs", "2", "--ckpt_path", "last"], split)
    a, b = (_state(d / "checkpoints" / "gpt" / "last.ckpt") for d in (straight, split))
    assert a["global_step"] == b["global_step"] == 14
    _assert_equal_state(a, b)


def test_a_resumed_run_keeps_its_arithmetic(text_file, tmp_path):
    """Started where bf16 was slow (fp32, fp32 Newton-Schulz), resumed where the probe says it
    is fast: the run goes on in the arithmetic it started with (resume stays bit-exact)."""
    args = ["fit", *TINY["gpt-muon"], "--data.path", str(text_file), "--trainer.val_check_interval", "100"]
    run_cli([*args, "--trainer.max_steps", "3"], tmp_path, env_extra={"GPTNANO_FAST_BF16": "0"})
    run_cli([*args, "--trainer.max_steps", "5", "--ckpt_path", "last"], tmp_path, env_extra={"GPTNANO_FAST_BF16": "1"})
    meta = torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)["gptnano"]
    assert {k: meta[k] for k in ("precision", "device", "muon_dtype")} == \
        {"precision": "32-true", "device": "cpu", "muon_dtype": "float32"}


def _start_fit(args, cwd, env_extra: dict | None = None):
    return subprocess.Popen([sys.executable, "-m", "gptnano", *args], cwd=cwd, env=cli_env(env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_last_checkpoint_holds_the_final_step(text_file, tmp_path):
    """max_steps between two saves (validation every 5, last.ckpt every 100): the end of
    training still writes last.ckpt at step 7, so `--ckpt_path last` and predict see it."""
    run_cli(["fit", *TINY_GPT, "--data.path", str(text_file), "--trainer.max_steps", "7",
             "--trainer.val_check_interval", "5"], tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)["global_step"] == 7


def _folder_state(folder: Path) -> tuple:
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)))
    except FileNotFoundError:  # a file renamed away between listing and stat: a change too
        return ("changing",)


def kill_during_writes(args, cwd: Path, folder: Path, rounds: int, seed: int, env: dict) -> list[int]:
    """Start `gptnano fit ARGS`, watch ``folder`` and SIGKILL the process the moment it changes
    (a checkpoint write has begun) after a random number of changes; ``rounds`` times, each
    resuming the last. Returns the step each killed run left in last.ckpt."""
    rng, steps, last = random.Random(seed), [], folder / "last.ckpt"
    for _ in range(rounds):
        proc = _start_fit(args + (["--ckpt_path", "last"] if last.exists() else []), cwd, env)
        _wait_for(last, proc)
        before, changes = _folder_state(folder), rng.randint(1, 6)
        while changes:
            assert proc.poll() is None, proc.communicate()
            now = _folder_state(folder)
            changes -= now != before
            before = now
        proc.kill()
        proc.wait()
        steps.append(torch.load(last, weights_only=True)["global_step"])  # a torn file would not load
    return steps


@posix_only("SIGKILL in the middle of a write; Windows has no SIGKILL (and refuses to rename over an open file)")
def test_sigkill_during_checkpoint_writes_leaves_a_whole_file(text_file, tmp_path):
    """Killed again and again while last.ckpt is being written, the file is always whole and
    the run resumes from it. The checkpoints are large (~30 MB) and rewritten every step, so
    writing is most of the run; the kill comes the moment the folder changes; and the system
    temp folder is another file system (/dev/shm), where a writer that builds the file there
    and moves it over would really copy it, and a kill mid-copy would tear it."""
    big = [*TINY_GPT, "--model.net.n_embd", "256", "--model.net.n_layer", "3", "--model.net.n_head", "4"]
    args = ["fit", *big, "--data.path", str(text_file), "--trainer.max_steps", "100000",
            "--trainer.val_check_interval", "1000", "--checkpoint.last_every_n_steps", "1"]
    other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    env = {"TMPDIR": tempfile.mkdtemp(dir=other_fs)}
    folder = tmp_path / "checkpoints" / "gpt"
    try:
        steps = kill_during_writes(args, tmp_path, folder, rounds=4, seed=1, env=env)
    finally:
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    assert steps == sorted(steps) and steps[0] > 0
    run_cli(["fit", *big, "--data.path", str(text_file), "--trainer.max_steps", str(steps[-1] + 3),
             "--trainer.val_check_interval", "1000", "--ckpt_path", "last"], tmp_path)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == steps[-1] + 3
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_non_finite_loss_stops_with_one_line(text_file, tmp_path):
    proc = run_cli(["fit", *TINY_GPT, "--data.path", str(text_file), "--trainer.max_steps", "50",
                    "--model.learning_rate", "1e30", "--model.warmup_steps", "0",
                    "--trainer.gradient_clip_val", "0", "--checkpoint.last_every_n_steps", "1"],
                   tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("gptnano: error: training stopped: the "), line
    ckpt = torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    if " at step " in line:
        assert ckpt["global_step"] <= int(line.split(" at step ")[1].split()[0])
    # The kept checkpoint is a usable one: every weight and optimizer moment finite.
    tensors = list(ckpt["state_dict"].values())
    tensors += [t for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values() if t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_checkpoints_load_with_weights_only(text_file, tmp_path):
    run_cli(["fit", *TINY_GPT, "--data.path", str(text_file), "--trainer.max_steps", "3"], tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["net"]["class_path"] == "gptnano.models.GPT"
    assert hp["vocab"] == "".join(sorted(set(text_file.read_text())))


def test_same_seed_same_run_other_seed_other_run(text_file, tmp_path):
    def train(folder, seed):
        folder.mkdir()
        run_cli(["fit", *TINY_GPT, "--model.net.dropout", "0.1", "--data.path", str(text_file),
                 "--trainer.max_steps", "5", "--seed_everything", str(seed),
                 "--trainer.deterministic", "true"], folder)
        return _state(folder / "checkpoints" / "gpt" / "last.ckpt")["state_dict"]
    a, b, c = train(tmp_path / "a", 1), train(tmp_path / "b", 1), train(tmp_path / "c", 2)
    _assert_equal_state(a, b)
    assert not all(torch.equal(a[k], c[k]) for k in a)
