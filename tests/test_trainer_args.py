"""Every argument of Lightning's Trainer, audited (issue 26, item 2): docs/trainer.md has a row for
each, "works" or "refused". The test's parameters are ``inspect.signature(Trainer.__init__)``:
an argument a later Lightning adds fails here until someone audits it. A refusal is checked
without a Trainer; a "works" row runs the cheapest fit that shows it."""

import inspect
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelSummary, Timer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.profilers import SimpleProfiler

from gptnano.errors import UserError
from gptnano.train.trainer_args import check_trainer
from tests.helpers import TINY_GPT, make_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
ROWS = dict(re.findall(r"^\| `(\w+)` \| (works|refused) \|", DOC.read_text(), flags=re.M))
ARGUMENTS = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
EPOCH = 42  # batches in an epoch of the 3,000-character text below (tests/test_trainer_flags.py)
ES = ["--early_stopping.patience", "0", "--early_stopping.min_delta", "10", "--trainer.val_check_interval", "2"]
REFUSED = {"barebones": True, "model_registry": "my-model"}  # the value each refusal is checked with


def fits(*flags: str, check, sub: str = "fit"):
    return (sub, list(flags), check)


# argument -> (subcommand, flags, check(cli, folder)): the cheapest run that shows the row works.
WORKS = {
    "accelerator": fits("--trainer.accelerator", "cpu", check=lambda c, f: isinstance(c.trainer.accelerator,
                                                                                      CPUAccelerator)),
    "strategy": fits("--trainer.strategy", "single_device", check=lambda c, f: c.trainer.global_step == 3),
    "devices": fits("--trainer.devices", "1", check=lambda c, f: c.trainer.num_devices == 1),
    "num_nodes": fits("--trainer.num_nodes", "1", check=lambda c, f: c.trainer.num_nodes == 1),
    "precision": fits("--trainer.precision", "bf16-mixed", check=lambda c, f: c.trainer.precision == "bf16-mixed"),
    "logger": fits("--trainer.logger", "false", check=lambda c, f: not c.trainer.loggers and
                   not (f / "lightning_logs").exists()),
    "callbacks": fits("--trainer.callbacks+=lightning.pytorch.callbacks.Timer",
                      check=lambda c, f: any(isinstance(x, Timer) for x in c.trainer.callbacks)),
    "fast_dev_run": fits("--trainer.fast_dev_run", "2", check=lambda c, f: c.trainer.global_step == 2 and
                         not list(f.glob("checkpoints/*/*.ckpt"))),
    "max_epochs": fits("--trainer.max_epochs", "1", "--trainer.max_steps", "-1",
                       check=lambda c, f: c.trainer.global_step == EPOCH),
    "min_epochs": fits("--trainer.min_epochs", "1", "--trainer.max_steps", "100", *ES,
                       check=lambda c, f: c.trainer.global_step >= EPOCH),
    "max_steps": fits("--trainer.max_steps", "3", check=lambda c, f: c.trainer.global_step == 3),
    "min_steps": fits("--trainer.min_steps", "8", "--trainer.max_steps", "100", *ES,
                      check=lambda c, f: 8 <= c.trainer.global_step < 100),
    "max_time": fits("--trainer.max_time", "00:00:00:01", "--trainer.max_steps", "1000000",
                     check=lambda c, f: 0 < c.trainer.global_step < 1000000),
    "limit_train_batches": fits("--trainer.limit_train_batches", "5", "--trainer.max_epochs", "2",
                                "--trainer.max_steps", "-1", check=lambda c, f: c.trainer.global_step == 10),
    "limit_val_batches": fits("--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "2",
                              check=lambda c, f: not (f / "checkpoints" / "gpt" / "best.ckpt").exists()),
    "limit_test_batches": fits("--trainer.limit_test_batches", "1", "--data.eval_batch_size", "1", sub="test",
                               check=lambda c, f: c.trainer.num_test_batches == [1]),
    "limit_predict_batches": fits("--trainer.limit_predict_batches", "1", "--data.prompt", "[R, J]",
                                  "--model.max_new_tokens", "2", sub="predict",
                                  check=lambda c, f: c.trainer.num_predict_batches == [1]),
    "overfit_batches": fits("--trainer.overfit_batches", "1", check=lambda c, f: c.trainer.num_training_batches == 1),
    "val_check_interval": fits("--trainer.val_check_interval", "0.5", "--trainer.max_epochs", "1",
                               "--trainer.max_steps", "-1", check=lambda c, f: c.trainer.val_check_batch == EPOCH // 2),
    "check_val_every_n_epoch": fits("--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "1.0",
                                    "--trainer.max_epochs", "1", "--trainer.max_steps", "-1",
                                    check=lambda c, f: (f / "checkpoints" / "gpt" / "best.ckpt").is_file()),
    "num_sanity_val_steps": fits("--trainer.num_sanity_val_steps", "0",
                                 check=lambda c, f: c.trainer.num_sanity_val_steps == 0),
    "log_every_n_steps": fits("--trainer.log_every_n_steps", "1", check=lambda c, f: c.trainer.log_every_n_steps == 1),
    "enable_checkpointing": fits("--trainer.enable_checkpointing", "false", "--trainer.val_check_interval", "2",
                                 check=lambda c, f: not list(f.glob("checkpoints/*/*.ckpt"))),
    "enable_progress_bar": fits("--trainer.enable_progress_bar", "false",
                                check=lambda c, f: c.trainer.progress_bar_callback is None),
    "enable_model_summary": fits("--trainer.enable_model_summary", "false",
                                 check=lambda c, f: not any(isinstance(x, ModelSummary) for x in c.trainer.callbacks)),
    "accumulate_grad_batches": fits("--trainer.accumulate_grad_batches", "2",
                                    check=lambda c, f: c.trainer.global_step == 3 and
                                    c.trainer.fit_loop.epoch_loop.total_batch_idx == 5),
    "gradient_clip_val": fits("--trainer.gradient_clip_val", "0.5", check=lambda c, f: c.trainer.gradient_clip_val == 0.5),
    "gradient_clip_algorithm": fits("--trainer.gradient_clip_algorithm", "value",
                                    check=lambda c, f: c.trainer.gradient_clip_algorithm == "value"),
    "deterministic": fits("--trainer.deterministic", "true", check=lambda c, f: torch.are_deterministic_algorithms_enabled()),
    "benchmark": fits("--trainer.benchmark", "true", check=lambda c, f: torch.backends.cudnn.benchmark),
    "inference_mode": fits("--trainer.inference_mode", "false", "--trainer.val_check_interval", "2",
                           check=lambda c, f: (f / "checkpoints" / "gpt" / "best.ckpt").is_file()),
    "use_distributed_sampler": fits("--trainer.use_distributed_sampler", "false",
                                    check=lambda c, f: c.trainer.global_step == 3),
    "profiler": fits("--trainer.profiler", "simple", check=lambda c, f: isinstance(c.trainer.profiler, SimpleProfiler)),
    "detect_anomaly": fits("--trainer.detect_anomaly", "true", check=lambda c, f: c.trainer.global_step == 3),
    "plugins": fits("--trainer.plugins", "lightning.pytorch.plugins.io.TorchCheckpointIO",
                    check=lambda c, f: type(c.trainer.strategy.checkpoint_io) is TorchCheckpointIO),
    "sync_batchnorm": fits("--trainer.sync_batchnorm", "true", check=lambda c, f: c.trainer.global_step == 3),
    "reload_dataloaders_every_n_epochs": fits("--trainer.reload_dataloaders_every_n_epochs", "1",
                                              "--trainer.max_epochs", "2", "--trainer.max_steps", "-1",
                                              check=lambda c, f: c.trainer.global_step == 2 * EPOCH),
    "default_root_dir": fits("--trainer.default_root_dir", "runs",
                             check=lambda c, f: (f / "runs" / "checkpoints" / "gpt" / "last.ckpt").is_file()),
    "enable_autolog_hparams": fits("--trainer.enable_autolog_hparams", "false",
                                   check=lambda c, f: c.trainer.global_step == 3),
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 3-step run holding out a test split, for the rows that need test or predict."""
    from gptnano.cli.lightning import GPTNanoCLI

    folder = tmp_path_factory.mktemp("evaluated")
    (folder / "short.txt").write_text(make_text(3000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        GPTNanoCLI(args=["fit", *TINY_GPT, "--data.path", "short.txt", "--data.test_fraction", "0.1",
                         "--trainer.max_steps", "3", "--run_name", "e"])
    return folder


def test_every_argument_has_a_row():
    assert set(ROWS) == set(ARGUMENTS), "docs/trainer.md and Trainer.__init__ differ: audit " + \
        ", ".join(sorted(set(ARGUMENTS) ^ set(ROWS)))
    assert {name for name, verdict in ROWS.items() if verdict == "refused"} == set(REFUSED)


@pytest.mark.parametrize("name", ARGUMENTS)
def test_trainer_argument(name, tmp_path, monkeypatch, evaluated):
    verdict = ROWS.get(name)
    assert verdict, f"Trainer.{name} has no row in docs/trainer.md: audit it (works, or refused and why)"
    if verdict == "refused":
        with pytest.raises(UserError, match=rf"--trainer\.{name} is not supported by gptnano: "):
            check_trainer({"max_steps": 10, name: REFUSED[name]})
        return
    from gptnano.cli import quiet
    from gptnano.cli.lightning import GPTNanoCLI

    quiet.hide_noise()  # what `gptnano` hides, each for its reason (in this test's warnings scope only)
    sub, flags, check = WORKS[name]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    previous = torch.are_deterministic_algorithms_enabled()
    if sub == "fit":
        (tmp_path / "short.txt").write_text(make_text(3000), encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        args = ["fit", *TINY_GPT, "--data.path", "short.txt", "--trainer.max_steps", "3", *flags]
    else:
        monkeypatch.chdir(evaluated)
        args = [sub, "--ckpt_path", "checkpoints/e/last.ckpt", *flags]
    try:
        cli = GPTNanoCLI(args=args)
        assert check(cli, Path.cwd()), f"--trainer.{name}: the run does not show it"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_an_accelerator_the_machine_lacks_is_one_line(gptnano, tmp_path):
    missing = "mps" if torch.cuda.is_available() else "cuda"  # no machine has both
    (tmp_path / "short.txt").write_text(make_text(3000), encoding="utf-8")
    ran = gptnano(["fit", *TINY_GPT, "--data.path", "short.txt", "--trainer.accelerator", missing], tmp_path)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert ran.stderr.strip().splitlines()[-1].startswith("gptnano: error: "), ran.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
