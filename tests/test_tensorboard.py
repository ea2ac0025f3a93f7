"""What a user finds in TensorBoard after `gptnano fit`: grouped tags, Lightning's `epoch`,
validation at the optimizer step it scored, hp_metric = best validation loss in
the HPARAMS tab beside the run's settings, a text sample headed by its settings;
and `gptnano plot` reading both these logs and logs written before them."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from gptnano.cli.plot import summary
from gptnano.logs import read_run
from gptnano.train.logger import Board, RunSettings, hparams_table
from tests.helpers import TINY_GPT, run_cli


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> EventAccumulator:
    """20 Muon steps, validation every 10, everything logged at every step."""
    from tests.helpers import make_text

    folder = tmp_path_factory.mktemp("board")
    text = folder / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    run_cli(["fit", *TINY_GPT, "--data.path", str(text), "--model.optimizer", "muon", "--trainer.max_steps", "20",
             "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1",
             "--model.temperature", "0.7", "--model.top_k", "5"], folder)
    acc = EventAccumulator(str(folder / "lightning_logs" / "gpt" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_tags_are_grouped_and_epoch_counts_epochs(events):
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpc", "val/ppl", "perf/tok_s", "perf/mfu", "hp_metric"} <= tags
    assert {e.value for e in events.Scalars("epoch")} == {0.0}  # 20 steps of a 281-batch epoch
    lr = {t for t in tags if t.startswith("lr/")}
    assert lr == {"lr/MuonAdamW/muon", "lr/MuonAdamW/adamw", "lr/MuonAdamW/adamw_no_decay"}, tags
    assert tags - lr == {"train/loss", "val/loss", "val/bpc", "val/ppl", "perf/tok_s", "perf/mfu", "hp_metric", "epoch"}


def test_steps_count_optimizer_updates(events):
    """train/loss at step s: before update s + 1; val/loss at s: after update s."""
    assert [e.step for e in events.Scalars("train/loss")] == list(range(20))
    assert [e.step for e in events.Scalars("val/loss")] == [10, 20]
    val = [e.value for e in events.Scalars("val/loss")]
    assert [e.value for e in events.Scalars("val/bpc")] == pytest.approx([v / math.log(2) for v in val])
    assert [e.value for e in events.Scalars("val/ppl")] == pytest.approx([math.exp(v) for v in val], rel=1e-5)


def test_hp_metric_is_the_best_validation_loss(events):
    val = [e.value for e in events.Scalars("val/loss")]
    hp = events.Scalars("hp_metric")
    assert [e.step for e in hp] == [10, 20]
    assert [e.value for e in hp] == pytest.approx([min(val[:i + 1]) for i in range(len(val))])
    assert all(e.value >= 0 for e in hp)  # no -1 placeholder


def test_hparams_tab_has_the_runs_settings_and_the_metric(events):
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric", "val/loss"]  # best and last
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = {k: v.string_value or v.number_value for k, v in session.hparams.items()}
    assert hp["net"] == "GPT" and hp["net.n_layer"] == 1 and hp["optimizer"] == "muon"
    assert hp["data.batch_size"] == 4 and hp["trainer.max_steps"] == 20 and hp["seed"] == 1337
    assert "vocab" not in hp and not any(k.startswith("_") for k in hp)


def test_text_sample_names_its_step_and_settings(events):
    samples = events.Tensors("sample/text_summary")
    assert [s.step for s in samples] == [10, 20]
    heading = samples[0].tensor_proto.string_val[0].decode().splitlines()[0]
    assert heading == "step 10: 200 new tokens, temperature 0.7, top_k 5, top_p None, seed None"


def test_hparams_table_flattens_a_network_and_leaves_out_the_vocabulary():
    params = {"net": {"class_path": "gptnano.models.GPT", "init_args": {"n_layer": 4, "bias": True}},
              "vocab": "abc", "_instantiator": "x", "top_k": None, "betas": (0.9, 0.99), "sched": {"kind": "cos"}}
    assert hparams_table(params) == {"net": "GPT", "net.n_layer": 4, "net.bias": True, "top_k": "None",
                                     "betas": "(0.9, 0.99)", "sched.kind": "cos"}


def test_plot_reads_logs_written_before_the_grouped_tags(tmp_path):
    """Old names, and validation at Lightning's global_step - 1: read as today's names and steps."""
    old = tmp_path / "old" / "version_0"
    with SummaryWriter(str(old)) as w:
        for step, loss in [(9, 2.5), (19, 2.1)]:
            w.add_scalar("val_loss", loss, step)
        for step in (4, 9, 14, 19):
            w.add_scalar("train_loss", 3.0, step)
            w.add_scalar("tok_s", 1000.0 + step, step)
            w.add_scalar("mfu", 0.25, step)
    run = read_run(tmp_path / "old")
    assert [(s, v) for _, s, v in run["series"]["val/loss"]] == [(10, 2.5), (20, pytest.approx(2.1))]
    assert [s for _, s, _ in run["series"]["train/loss"]] == [4, 9, 14, 19]  # training steps were right already
    row = summary(run)
    assert row["steps"] == 20 and row["best val_loss"] == "2.1000" and row["tok/s"] == 1014 and row["MFU"] == "25.0%"


def test_a_resumed_run_goes_on_from_its_best_loss(tmp_path):
    """hp_metric after a restart is the best loss of the whole run, not of the resumed part."""
    board = Board(save_dir=str(tmp_path), name="run")
    from gptnano.train.checkpointing import Checkpoint

    ours = Checkpoint(monitor="val/loss")
    ours.best_model_score = torch.tensor(1.5)
    theirs = SimpleNamespace(best_model_score=torch.tensor(0.1))  # a user's ModelCheckpoint of another metric
    trainer = SimpleNamespace(loggers=[board], checkpoint_callbacks=[theirs, ours])
    RunSettings().on_train_start(trainer, None)
    written = {}
    board._session_written = True
    board.experiment.add_scalar = lambda tag, value, step: written.setdefault(tag, value)
    board.log_metrics({"val/loss": 1.7}, step=10)
    assert written["hp_metric"] == 1.5 and written["val/loss"] == 1.7


def test_plot_reads_versions_in_number_order():
    from gptnano.logs import version_number

    names = ["version_10", "version_2", "version_0", "version_x"]
    assert sorted(names, key=lambda n: version_number(Path(n))) == ["version_0", "version_2", "version_10", "version_x"]
