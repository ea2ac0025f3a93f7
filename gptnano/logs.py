"""A run's TensorBoard logs as plain numbers: its ``version_N`` folders in the order they were
written (a resumed run has several), and the scalars of every one. Read by `gptnano plot`,
`gptnano compare` and the benchmarks. tensorboard is imported only when a run is read; no
Lightning, no torch.
"""

from pathlib import Path

from gptnano.errors import UserError

# Tags of logs written before the grouped names of gptnano/train/logger.py, and their names now.
OLD_TAGS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_bpc": "val/bpc", "val_ppl": "val/ppl",
            "tok_s": "perf/tok_s", "mfu": "perf/mfu"}


def version_number(folder: Path) -> tuple:
    """Sort key of a ``version_N`` folder: by N as a number (version_10 after version_2), so a
    step logged again by a later version comes after the earlier one's."""
    tail = folder.name.rpartition("_")[2]
    return (0, int(tail), "") if tail.isdigit() else (1, 0, folder.name)


def versions(folder: Path) -> list[Path]:
    """The version_* folders of a run's logs, in ``version_number`` order."""
    return sorted((p for p in folder.glob("version_*") if p.is_dir()), key=version_number)


def read_run(folder: Path) -> dict:
    """Scalars of every version_* under ``folder`` (a resumed run spans several), in step
    order, under today's tag names (older logs are read too). Training curves only: what
    validate, test and predict log goes to ``folder/eval/``, which is not read."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list] = {}
    for version in versions(folder) or [folder]:
        acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            name = OLD_TAGS.get(tag, tag)
            # Old validations were logged at Lightning's global_step - 1: move them to the
            # optimizer step they followed, where new logs put them.
            shift = 1 if tag != name and name.startswith("val/") else 0
            series.setdefault(name, []).extend((e.wall_time, e.step + shift, e.value) for e in acc.Scalars(tag))
    if "val/loss" not in series:
        raise UserError(f"no validation loss (val/loss) logged under {folder}")
    for values in series.values():
        values.sort(key=lambda e: e[1])
    start = min(e[0] for values in series.values() for e in values)
    return {"name": folder.name, "series": series, "start": start}
