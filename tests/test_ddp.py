"""Two CPU processes through Lightning's DDP (gloo): training, a validation loss equal to
the single-process one on a trained model, one set of checkpoints and one prediction file."""

import re

import torch
import torch.nn.functional as F

from gptnano.checkpoint import load_net
from gptnano.data.windows import EvalWindows
from tests.helpers import TINY_GPT, run_cli

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
FP32 = ["--trainer.precision", "32-true"]  # the comparison is about the reduction, not bf16 rounding


def _val_loss(stdout: str) -> float:
    """val/loss from Lightning's results table: plain, or drawn with box characters when `rich` is
    installed (transformers 5 brings it)."""
    return float(re.search(r"val/loss[\s│┃|]+([0-9.]+)", stdout).group(1))


def _window_losses(ckpt, text: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and scored-target count of every validation window, in one process."""
    net, tokenizer, _ = load_net(ckpt)
    data = tokenizer.encode(text)
    val = data[int(0.9 * len(data)):]
    sums, counts = [], []
    with torch.no_grad():
        for x, y in EvalWindows(val, block, batch_size=1):
            sums.append(F.cross_entropy(net(x)[0], y[0], ignore_index=-100, reduction="sum"))
            counts.append((y != -100).sum())
    return torch.stack(sums).double(), torch.stack(counts).double()


def test_ddp_two_cpu_processes(text_file, tmp_path):
    fit = run_cli(["fit", *TINY_GPT, *DDP, "--data.path", str(text_file), "--trainer.max_steps", "6",
                   "--trainer.val_check_interval", "6"], tmp_path)
    # One token cache on disk, tokenised once (by rank 0): the other rank only read it.
    assert len(list((tmp_path / "data" / "prepared").glob("*.bin"))) == 1
    assert fit.stderr.count("gptnano: tokenized") == 1
    folder = tmp_path / "checkpoints" / "gpt"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # written once, by rank 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6

    out = run_cli(["predict", *DDP, "--ckpt_path", str(folder / "last.ckpt"), "--data.prompt", '["RO", "JU", "KI"]',
                   "--model.max_new_tokens", "5", "--trainer.enable_progress_bar", "false"], tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [l[:2] for l in lines] == ["RO", "JU", "KI"]  # each prompt once, in order
    files = list(tmp_path.glob("lightning_logs/gpt/eval/version_*/predictions.txt"))  # with the run's evaluations
    assert len(files) == 1 and files[0].read_text().strip().splitlines() == lines


def test_ddp_validation_equals_one_process_on_a_trained_model(text_file, tmp_path):
    """Validation split over 2 ranks and reduced equals the single-process pass to float32
    rounding; on a trained model a dropped or repeated window would move it far more."""
    run_cli(["fit", *TINY_GPT, *FP32, "--data.path", str(text_file), "--trainer.max_steps", "150",
             "--model.learning_rate", "1e-2", "--trainer.val_check_interval", "150"], tmp_path)
    ckpt = tmp_path / "checkpoints" / "gpt" / "last.ckpt"
    common = ["validate", *TINY_GPT, *FP32, "--data.path", str(text_file), "--ckpt_path", str(ckpt)]
    single = _val_loss(run_cli(common, tmp_path).stdout)
    ddp = _val_loss(run_cli([*common, *DDP], tmp_path).stdout)
    tolerance = 1e-6 * single  # float32 rounding of a sum in another order
    assert abs(ddp - single) <= tolerance, (ddp, single)

    sums, counts = _window_losses(ckpt, text_file.read_text(), block=16)
    mean = sums.sum() / counts.sum()
    assert abs(mean - single) < 1e-4  # the per-window losses are this very pass
    assert single < 2.5  # trained: far below the ~3.8 of uniform guessing over the vocabulary
    dropped = (sums.sum() - sums) / (counts.sum() - counts)  # the mean without window i, for every i
    repeated = (sums.sum() + sums) / (counts.sum() + counts)
    # Nearly every window (all but the few whose own loss sits at the mean) moves it visibly.
    assert ((dropped - mean).abs() > 10 * tolerance).double().mean() > 0.9
    assert ((repeated - mean).abs() > 10 * tolerance).double().mean() > 0.9
