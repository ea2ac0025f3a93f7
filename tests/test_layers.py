"""The package's layers and its one-way import rule, checked on the source of every module.

    models  <-  data, sampling, checkpoint, hardware, devices, views  <-  train  <-  cli, compare, api

(``errors``, ``files``, ``lines``, ``logs`` and ``numbers`` sit below them all.) A module imports,
at import time, only from its own layer or lower ones; there are no import circles, not even
inside a layer; the models import only torch; the dispatcher and every tool of its command
table import nothing that imports Lightning; and the ``__init__.py`` files of the
layers are empty. Function-level imports are allowed: that is how the dispatcher
reaches the Lightning CLI only when a Lightning command runs.
"""

import ast
import sys
from pathlib import Path

import pytest

import gptnano
from gptnano.cli.commands import TOOLS

PACKAGE = Path(gptnano.__file__).parent
LAYERS = {  # layer number -> the modules in it (a name covers its subpackage)
    0: ["gptnano", "gptnano.errors", "gptnano.files", "gptnano.lines", "gptnano.logs", "gptnano.numbers"],
    1: ["gptnano.models"],
    2: ["gptnano.data", "gptnano.sampling", "gptnano.checkpoint", "gptnano.hardware", "gptnano.export",
        "gptnano.devices", "gptnano.views"],
    3: ["gptnano.train"],
    4: ["gptnano.cli", "gptnano.compare", "gptnano.api", "gptnano.__main__"],
}
LIGHTNING = ("lightning", "pytorch_lightning", "torchmetrics")  # third-party names that mean "imports Lightning"
# Modules that import Lightning by design; everything else must not, even indirectly.
WITH_LIGHTNING = {"gptnano.data.datamodule", "gptnano.cli.lightning", "gptnano.cli.quiet"}
WITH_LIGHTNING_PREFIX = "gptnano.train."
MODELS_MAY_IMPORT = {"torch", "gptnano.errors"}  # besides the standard library and gptnano.models itself


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def top_level_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Modules imported when the module is imported: every import statement outside a function
    (``from a import b`` counts as ``a.b`` when that is a module, else as ``a``)."""
    found, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # runs when called, not when imported
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name if is_package else name.rsplit(".", 1)[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> gptnano modules it imports, module -> third-party top-level names it imports)."""
    inner, outer = {}, {}
    for name, path in modules.items():
        names = top_level_imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
        inner[name] = {n for n in names if n in modules and n != name}
        outer[name] = {n.split(".")[0] for n in names if not n.startswith("gptnano")}
    return inner, outer


def layer_of(name: str) -> int | None:
    best = None
    for layer, roots in LAYERS.items():
        for root in roots:
            if name == root or (root != "gptnano" and name.startswith(root + ".")):
                if best is None or len(root) > len(best[1]):
                    best = (layer, root)
    return best[0] if best else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
            for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first walk (each reported once, by the edge closing it)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    return found


def importers_of_lightning(graph: dict[str, set[str]], outer: dict[str, set[str]]) -> set[str]:
    """Modules whose import imports Lightning, directly or through other gptnano modules."""
    tainted = {m for m, names in outer.items() if names & set(LIGHTNING)}
    changed = True
    while changed:
        more = {m for m, targets in graph.items() if targets & tainted} - tainted
        tainted |= more
        changed = bool(more)
    return tainted


@pytest.fixture(scope="module")
def graph():
    return import_graph(all_modules())


def test_every_module_has_a_layer():
    assert [m for m in all_modules() if layer_of(m) is None] == []


def test_nothing_imports_upward(graph):
    assert upward_imports(graph[0]) == []


def test_no_import_circles(graph):
    assert circles(graph[0]) == []


def test_the_models_import_only_torch(graph):
    inner, outer = graph
    stdlib = set(sys.stdlib_module_names)
    for name in (m for m in inner if layer_of(m) == 1):
        assert outer[name] - stdlib <= MODELS_MAY_IMPORT, name
        assert {t for t in inner[name] if layer_of(t) != 1} <= MODELS_MAY_IMPORT, name


def test_only_the_lightning_layers_import_lightning(graph):
    tainted = importers_of_lightning(*graph)
    allowed = {m for m in tainted if m in WITH_LIGHTNING or m.startswith(WITH_LIGHTNING_PREFIX)}
    assert tainted - allowed == set(), "these import Lightning at import time"
    tools = {module for module, _ in TOOLS.values()}
    assert tools and tools <= set(all_modules())
    assert not (tools | {"gptnano.cli.main", "gptnano.cli.commands", "gptnano.__main__"}) & tainted
    lightning_free_data = {"gptnano.data.tokenizer", "gptnano.data.text", "gptnano.data.cache"}
    assert lightning_free_data <= set(all_modules()) and not lightning_free_data & tainted


def test_layer_init_files_are_empty():
    """A re-export in an __init__.py would drag its imports (Lightning) into every import of the
    package. The registry in gptnano/models/__init__.py is the one exception: it is what makes
    ``gptnano.models.GPT`` resolve for configs and checkpoints."""
    for path in PACKAGE.rglob("__init__.py"):
        if path.parent in (PACKAGE, PACKAGE / "models"):
            continue
        assert path.read_text().strip() == "", path


# The checker itself catches what it is there to catch.
def test_the_checker_finds_an_upward_import_and_a_circle():
    graph = {"gptnano.models.gpt": {"gptnano.train.module"}, "gptnano.train.module": {"gptnano.train.optim"},
             "gptnano.train.optim": {"gptnano.train.module"}}
    assert upward_imports(graph) == ["gptnano.models.gpt (layer 1) imports gptnano.train.module (layer 3)"]
    assert circles(graph) == [["gptnano.train.module", "gptnano.train.optim", "gptnano.train.module"]]
    tainted = importers_of_lightning({"gptnano.cli.plot": {"gptnano.checkpoint"}, "gptnano.checkpoint": set()},
                                     {"gptnano.cli.plot": set(), "gptnano.checkpoint": {"lightning"}})
    assert tainted == {"gptnano.cli.plot", "gptnano.checkpoint"}


def test_function_level_imports_do_not_count():
    tree = ast.parse("import os\nfrom gptnano import errors\ndef f():\n    import lightning\n"
                     "try:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n")
    assert top_level_imports(tree, "gptnano.x", False) == {"os", "gptnano", "gptnano.errors", "fcntl"}


def test_the_suite_tells_its_end_to_end_tests_apart():
    """tests/conftest.py marks a test e2e when it, its fixtures or the test functions it calls
    start gptnano or a Trainer: `pytest -m "not e2e"` is then the fast layer."""
    from tests import test_compat, test_reliability, test_tokenizer
    from tests.conftest import END_TO_END, _reaches

    assert _reaches(test_reliability.test_last_checkpoint_holds_the_final_step, END_TO_END, set())  # run_cli
    assert _reaches(test_reliability.test_sigkill_during_checkpoint_writes_leaves_a_whole_file, END_TO_END,
                    set())  # through kill_during_writes -> _start_fit
    assert not _reaches(test_compat.test_an_old_checkpoint_loads_and_gives_the_same_logits, END_TO_END, set())
    assert not _reaches(test_tokenizer.test_char_encoding_is_the_dict_lookup, END_TO_END, set())
