"""Two CPU processes through Lightning's DDP (gloo): training, a validation loss
equal to the single-process one, one set of checkpoints and one prediction file."""

import re

import torch

from tests.conftest import TINY_GPT, run_cli


def _val_loss(stdout: str) -> float:
    return float(re.search(r"val/loss\s+([0-9.]+)", stdout).group(1))


def test_ddp_two_cpu_processes(text_file, tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run_cli(["fit", *TINY_GPT, *ddp, "--data.path", str(text_file), "--trainer.max_steps", "6",
             "--trainer.val_check_interval", "6"], tmp_path)
    folder = tmp_path / "checkpoints" / "gpt"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # written once, by rank 0
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    ddp_score = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Checkpoint"))["best_model_score"]

    # The same weights validated by one process: the loss reduced over 2 ranks must agree.
    single = run_cli(["validate", *TINY_GPT, "--data.path", str(text_file), "--ckpt_path", str(folder / "last.ckpt")], tmp_path)
    assert abs(_val_loss(single.stdout) - float(ddp_score)) < 1e-4

    out = run_cli(["predict", *ddp, "--ckpt_path", str(folder / "last.ckpt"), "--data.prompt", '["RO", "JU", "KI"]',
                   "--model.max_new_tokens", "5", "--trainer.enable_progress_bar", "false"], tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [l[:2] for l in lines] == ["RO", "JU", "KI"]  # each prompt once, in order
    files = list(tmp_path.glob("lightning_logs/gpt/version_*/predictions.txt"))
    assert len(files) == 1 and files[0].read_text().strip().splitlines() == lines
