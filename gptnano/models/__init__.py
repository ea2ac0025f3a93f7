"""The registry: every architecture, named once.

``--model.net GPT`` (or any name below) picks one on the command line; adding
an architecture is one file in this folder, one line here and one YAML in
``configs/``.
"""

from gptnano.models.backpack import Backpack
from gptnano.models.base import LanguageModel
from gptnano.models.cnn import CNN
from gptnano.models.gpt import GPT
from gptnano.models.rnn import RNN

MODELS: dict[str, type[LanguageModel]] = {
    "gpt": GPT,
    "backpack": Backpack,
    "cnn": CNN,
    "rnn": RNN,
}

__all__ = ["LanguageModel", "MODELS", *(cls.__name__ for cls in MODELS.values())]
