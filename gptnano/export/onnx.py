"""`gptnano export --format onnx`: the full-context forward pass as an ONNX graph.

``model.onnx`` maps ``idx`` (int64, ``[batch, sequence]``) to ``logits`` (float32,
``[batch, sequence, vocab]``), batch and sequence both dynamic: the sequence up to the
context (``block_size``) for the GPT, the Backpack and the CNN, whose positions or
receptive field stop there, and of any length for the RNN, whose recurrence exports as
one ONNX ``Scan`` loop (``gptnano.models.rnn.elman_scan_exportable``). Beside it, the
tokenizer files of the transformers export (gptnano/export/hf.py), usable with the
``tokenizers`` package alone, and the vocabulary in the graph's metadata too.

Through torch 2.13's exporter (``torch.onnx.export(..., dynamo=True)``: ``torch.export``
then ONNX Script), which needs the ``onnx`` and ``onnxscript`` packages.
"""

import importlib.util
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from gptnano.errors import UserError
from gptnano.export.hf import tokenizer_files
from gptnano.files import atomic_write
from gptnano.models.base import LanguageModel

NEEDS = "pip install -e '.[export]' (or pip install onnx onnxscript)"
EXAMPLE_LENGTH = 8  # the length traced; any other length within the limits runs too


@contextmanager
def exporter_quiet():
    """The exporter's progress lines, its note that torchvision is absent and its deprecation
    warnings ask nothing of a user: hidden while it runs (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def onnx_program(net: LanguageModel):
    """``net``'s forward pass exported by torch (a ``torch.onnx.ONNXProgram``), batch and
    sequence dynamic (the sequence up to ``net.max_context`` where there is one)."""
    for module in ("onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--format onnx needs the {module} package: {NEEDS}")
    limit = net.max_context
    length = EXAMPLE_LENGTH if limit is None else min(EXAMPLE_LENGTH, limit)
    idx = torch.zeros(2, length, dtype=torch.long)  # batch 2: a size of 1 would be taken as fixed
    dims = {0: torch.export.Dim("batch", min=1)}
    if limit is None or limit > 1:
        dims[1] = torch.export.Dim("sequence", min=1, max=limit)
    with exporter_quiet(), torch.no_grad():
        return torch.onnx.export(net.eval(), (idx,), input_names=["idx"], output_names=["logits"],
                                 dynamic_shapes={"idx": dims}, dynamo=True, verbose=False)


def write_onnx(net: LanguageModel, tokenizer, out: Path) -> list[Path]:
    """Write ``out/model.onnx`` and the tokenizer files; returns the files written.

    The graph's metadata holds ``gptnano.architecture``, ``gptnano.max_context`` (empty:
    any length), ``gptnano.tokenizer`` (char or byte) and ``gptnano.vocab`` (a char
    tokenizer's characters, id i being character i).

    Raises:
        UserError: onnx, onnxscript or tokenizers is missing.
        WriteError: a file could not be written.
    """
    files = tokenizer_files(tokenizer, net.max_context)
    program = onnx_program(net)
    program.model.metadata_props.update({
        "gptnano.architecture": type(net).__name__,
        "gptnano.max_context": "" if net.max_context is None else str(net.max_context),
        "gptnano.tokenizer": tokenizer.kind,
        "gptnano.vocab": tokenizer.vocab,
    })
    # One file, weights inside: ONNX's 2 GB limit for that is far above gptnano's model sizes.
    written = [atomic_write(out / "model.onnx", program.model_proto.SerializeToString())]
    written += [atomic_write(out / name, text) for name, text in files.items()]
    return written
