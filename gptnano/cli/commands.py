"""The command table of ``gptnano``: every subcommand, where it lives and what it does.

A module of plain data, imported by the dispatcher (gptnano/cli/main.py) and by
LightningCLI's help (gptnano/cli/lightning.py), so neither imports the other.
Adding a tool is one line in TOOLS and a module with ``main(argv)``.
"""

LIGHTNING = {  # LightningCLI's subcommands; `gptnano COMMAND --help` lists every option
    "fit": "train a model (resume one with --ckpt_path last)",
    "validate": "score a checkpoint on the validation split",
    "test": "score a checkpoint on the test split (--data.test_fraction)",
    "predict": "sample from a checkpoint in a batch, printed and written to predictions.txt (DDP-able)",
}
TOOLS = {  # name -> (module whose main(argv) runs it, what it does)
    "generate": ("gptnano.cli.generate", "stream text from a checkpoint as it is sampled; --interactive to talk to it"),
    "senses": ("gptnano.cli.senses", "print what each sense of a Backpack predicts; generate with a sense removed"),
    "plot": ("gptnano.cli.plot", "plot validation loss vs time and step for several runs, with a table"),
    "compare": ("gptnano.compare.command", "train configs for one budget over several seeds: mean ± std, ranking, plot"),
    "export": ("gptnano.cli.export", "write a trained model for use elsewhere: safetensors, transformers (GPT), ONNX"),
    "inspect": ("gptnano.cli.inspect", "write one HTML page showing what a model does inside a passage (no network)"),
}
