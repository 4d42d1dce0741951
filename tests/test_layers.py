"""Imports only go down: kernels <- functional <- nn <- models <- the CLI's modules, found over the AST of every
module of tether (function-level imports included); tether.reference is the oracle, imported by functional alone
(and by tests and benchmarks)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# a module's group (tether.<group>...) -> its layer: a group imports groups of lower layers only. _backend and
# _checks and _math sit below everything; ttt (the ttt-tk drop-in) is a peer of nn; nir exports modules, a peer of models.
LAYERS = {"_backend": 0, "_checks": 0, "_math": 0, "reference": 1, "kernels": 2, "functional": 3, "nn": 4, "ttt": 4,
          "models": 5, "nir": 5}
APPLICATION = 6  # train, cli, generate, evaluate, step, checkpoint, data, progress: they may import each other
ORACLE_USERS = {"functional"}


def _group(module: str):
    parts = module.split(".")
    return parts[1] if parts[0] == "tether" and len(parts) > 1 else None


def _imports(path: Path, module: str):
    """(line, imported module) for each import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, level - 1 packages up
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base == "tether":  # from tether import nn, checkpoint: the names are modules
                yield from ((node.lineno, f"tether.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, base


def bad_arrows(src: Path = SRC):
    """'file:line: importer -> imported (why)' for each import that breaks the layering."""
    found = []
    for path in sorted((src / "tether").rglob("*.py")):
        module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        importer = _group(module)
        if importer is None:  # tether/__init__.py: the package's face, above every layer
            continue
        for line, target in _imports(path, module):
            imported = _group(target)
            if imported is None or imported == importer:
                continue
            low, high = LAYERS.get(imported, APPLICATION), LAYERS.get(importer, APPLICATION)
            if imported == "reference" and importer not in ORACLE_USERS:
                why = "the oracle, outside functional"
            elif low > high:
                why = "upward"
            elif low == high and high != APPLICATION:
                why = "sideways"
            else:
                continue
            found.append(f"{path.relative_to(src)}:{line}: {module} -> {target} ({why})")
    return found


def test_imports_only_go_down():
    assert bad_arrows() == []


def test_the_check_sees_an_upward_import(tmp_path):
    (tmp_path / "tether" / "kernels").mkdir(parents=True)
    (tmp_path / "tether" / "kernels" / "x.py").write_text("from ..nn import LIF\nimport tether.reference.lif\n")
    assert bad_arrows(tmp_path) == ["tether/kernels/x.py:1: tether.kernels.x -> tether.nn (upward)",
                            "tether/kernels/x.py:2: tether.kernels.x -> tether.reference.lif "
                            "(the oracle, outside functional)"]


def borrowed_from_oracle(src: Path = SRC):
    """'file:line: name' for each name functional imports from a reference module that the module does not define
    itself as a function (a helper or constant it took from the shared modules, tether._checks / tether._math):
    functional may run the oracle's functions as its CPU path, but takes nothing else from it."""
    found = []
    for path in sorted((src / "tether" / "functional").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tether.reference.")):
                continue
            oracle = src / Path(*node.module.split(".")).with_suffix(".py")
            defined = {n.name for n in ast.parse(oracle.read_text(encoding="utf-8")).body
                       if isinstance(n, ast.FunctionDef)}
            found += [f"{path.relative_to(src)}:{node.lineno}: {alias.name}" for alias in node.names
                      if alias.name not in defined]
    return found


def test_functional_takes_only_the_oracles_functions():
    assert borrowed_from_oracle() == []


def test_the_check_sees_a_borrowed_helper(tmp_path):
    (tmp_path / "tether" / "functional").mkdir(parents=True)
    (tmp_path / "tether" / "reference").mkdir(parents=True)
    (tmp_path / "tether" / "reference" / "x.py").write_text("from tether._math import helper\n\ndef op():\n    pass\n")
    (tmp_path / "tether" / "functional" / "y.py").write_text("from tether.reference.x import helper, op\n")
    assert borrowed_from_oracle(tmp_path) == ["tether/functional/y.py:1: helper"]
