"""The package's shape, checked by reading the source with `ast` (nothing is imported, no subprocess).

Rules of the layout: imports go one way between the layers of metriclab/; evaluation stays free of Lightning and
trackers; no module imports another module's private name; third-party private APIs only in
metriclab/core/compat.py; no module in metriclab/ over 400 lines; no function over 60 lines unless a comment
says it reads better whole. Each rule is one test listing every offender, so one run shows them all.
The checkers take a root folder, so the tests at the bottom prove each rule on a small fake package.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("metriclab", "converters")
COMPAT = "metriclab.core.compat"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
WHOLE_MARK = "reads better whole"

# Which layers each layer may import (its own layer is always allowed). `jobs` may import anything.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "tracking": {"core"},
    "data": {"core"},
    "models": {"core", "data"},
    "evaluation": {"core", "data"},
    "inference": {"core", "data", "models", "evaluation"},
    "training": {"core", "data", "models", "evaluation", "tracking"},
    "converters": {"core", "data"},
}
LAYERS = set(ALLOWED) - {"converters"} | {"jobs"}
EVALUATION_FORBIDDEN = {"pytorch_lightning", "lightning", "mlflow", "neptune"}
PURE = "(it stays Lightning- and tracker-free)"
# namedtuple's public methods start with an underscore to avoid clashing with field names.
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


@dataclass
class Module:
    path: str  # relative to the root, for messages
    name: str  # dotted module name
    is_package: bool
    tree: ast.Module
    lines: list[str]

    @property
    def layer(self) -> str | None:
        parts = self.name.split(".")
        if parts[0] == "converters":
            return "converters"
        return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@dataclass
class Import:
    line: int
    module: str  # absolute dotted module the statement imports from
    names: list[str]  # names imported from it (`from m import a, b`); empty for `import m`
    bound: dict[str, str]  # local name -> dotted thing it stands for


def collect_modules(root: Path, packages: tuple[str, ...] = FIRST_PARTY) -> list[Module]:
    modules = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            text = path.read_text(encoding="utf-8")
            modules.append(Module(str(rel), ".".join(parts), is_package, ast.parse(text, str(rel)), text.splitlines()))
    return modules


def _sorted(offenders: list[str]) -> list[str]:
    """By file, then line number (ast.walk visits breadth-first)."""
    def key(offender: str) -> tuple[str, int]:
        where = offender.split(": ", 1)[0]
        path, _, line = where.rpartition(":")
        return (path, int(line)) if line.isdigit() else (where, 0)
    return sorted(offenders, key=key)


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_first_party(dotted: str) -> bool:
    return _top(dotted) in FIRST_PARTY


def _is_third_party(dotted: str) -> bool:
    top = _top(dotted)
    return bool(top) and top not in FIRST_PARTY and top not in sys.stdlib_module_names


def imports_of(module: Module) -> list[Import]:
    """Every import statement, at any depth (function-level imports count), with relative ones resolved."""
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                bound = {alias.asname: alias.name} if alias.asname else {_top(alias.name): _top(alias.name)}
                found.append(Import(node.lineno, alias.name, [], bound))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            bound = {a.asname or a.name: f"{target}.{a.name}" for a in node.names if a.name != "*"}
            found.append(Import(node.lineno, target, names, bound))
    return found


def _target_layers(imp: Import) -> list[tuple[str, str]]:
    """(dotted target, its layer or '') for a first-party import; `from metriclab import core` targets core."""
    if _top(imp.module) == "converters":
        return [(imp.module, "converters")]
    parts = imp.module.split(".")
    if len(parts) > 1:
        return [(imp.module, parts[1] if parts[1] in LAYERS else "")]
    if not imp.names:
        return [(imp.module, "")]
    return [(f"{imp.module}.{n}", n if n in LAYERS else "") for n in imp.names]


def layer_violations(modules: list[Module]) -> list[str]:
    out = []
    for m in modules:
        layer = m.layer
        if layer is None:
            if m.name != "metriclab":  # the package's own __init__ belongs to no layer and imports nothing
                out.append(f"{m.path}: module is in no layer (expected metriclab/<{'|'.join(sorted(LAYERS))}>/)")
            continue
        if layer == "jobs":
            continue
        for imp in imports_of(m):
            if not _is_first_party(imp.module):
                continue
            for target, target_layer in _target_layers(imp):
                if target_layer == layer:
                    continue
                if target_layer == "":
                    out.append(f"{m.path}:{imp.line}: imports {target}, which is in no layer")
                elif target_layer not in ALLOWED[layer]:
                    allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing of metriclab"
                    out.append(f"{m.path}:{imp.line}: {layer} imports {target} ({target_layer}); allowed: {allowed}")
    return _sorted(out)


def evaluation_purity_violations(modules: list[Module]) -> list[str]:
    out = []
    for m in modules:
        if m.layer != "evaluation":
            continue
        for imp in imports_of(m):
            if _top(imp.module) in EVALUATION_FORBIDDEN:
                out.append(f"{m.path}:{imp.line}: evaluation imports {imp.module} {PURE}")
    return _sorted(out)


def _attribute_chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """`a.b.c` -> ('a', ['b', 'c']); None when the base is not a plain name."""
    attrs = []
    cur: ast.expr = node
    while isinstance(cur, ast.Attribute):
        attrs.append(cur.attr)
        cur = cur.value
    if not isinstance(cur, ast.Name):
        return None
    return cur.id, attrs[::-1]


def _private_attribute_uses(module: Module, bound: dict[str, str]):
    """(line, dotted) for each `name._x...` where `name` was bound by an import; reported once per chain."""
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr) or node.attr in PUBLIC_UNDERSCORE:
            continue
        chain = _attribute_chain(node)
        if chain is None or chain[0] not in bound:
            continue
        base, attrs = chain
        if any(_is_private(a) and a not in PUBLIC_UNDERSCORE for a in attrs[:-1]):
            continue  # an outer private component of this chain is reported on its own node
        yield node.lineno, ".".join([bound[base], *attrs])


def private_import_violations(modules: list[Module]) -> list[str]:
    """Another module's private name, from metriclab or converters: make it public or move it."""
    out = []
    for m in modules:
        first_party_bound = {}
        for imp in imports_of(m):
            if not _is_first_party(imp.module):
                continue
            first_party_bound.update(imp.bound)
            for name in imp.names:
                if _is_private(name):
                    out.append(f"{m.path}:{imp.line}: imports private {name} from {imp.module}")
        for line, dotted in _private_attribute_uses(m, first_party_bound):
            out.append(f"{m.path}:{line}: uses private {dotted}")
    return _sorted(out)


def third_party_private_violations(modules: list[Module], compat: str = COMPAT) -> list[str]:
    """A private module, name or attribute of a third-party package anywhere but the compat module."""
    out = []
    for m in modules:
        if m.name == compat:
            continue
        third_party_bound = {}
        for imp in imports_of(m):
            if not _is_third_party(imp.module):
                continue
            third_party_bound.update(imp.bound)
            private_parts = [p for p in imp.module.split(".") if _is_private(p)]
            private_names = [n for n in imp.names if _is_private(n)]
            if private_parts or private_names:
                what = f"{imp.module}" + (f" import {', '.join(private_names)}" if private_names else "")
                out.append(f"{m.path}:{imp.line}: private third-party API {what} (only in {compat})")
        for line, dotted in _private_attribute_uses(m, third_party_bound):
            out.append(f"{m.path}:{line}: private third-party API {dotted} (only in {compat})")
    return _sorted(out)


def module_size_violations(modules: list[Module], limit: int = MAX_MODULE_LINES) -> list[str]:
    return [
        f"{m.path}: {len(m.lines)} lines (limit {limit})"
        for m in modules
        if _top(m.name) == "metriclab" and len(m.lines) > limit
    ]


def _says_whole(text: str) -> bool:
    return "#" in text and WHOLE_MARK in text.split("#", 1)[1]


def _marked_whole(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    """The line above the def or above its decorators, or a comment before its first statement."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    above = [lines[n - 2] for n in {first, node.lineno} if n >= 2]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]  # a comment may follow the docstring
    header = lines[node.lineno - 1 : body[0].lineno - 1] if body else []
    return any(_says_whole(line) for line in above) or any(_says_whole(line) for line in header)


def function_size_violations(modules: list[Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for m in modules:
        for node in ast.walk(m.tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > limit and not _marked_whole(node, m.lines):
                out.append(f"{m.path}:{node.lineno}: {node.name}() is {n} lines (limit {limit}; "
                           f"or a comment saying why it {WHOLE_MARK})")
    return _sorted(out)


def _report(offenders: list[str], what: str) -> str:
    return f"{len(offenders)} {what}:\n" + "\n".join(offenders)


# --- the repository ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo_modules() -> list[Module]:
    modules = collect_modules(REPO)
    assert any(m.name == "metriclab.core.config" for m in modules)  # the walk found the tree
    return modules


def test_imports_follow_the_layers(repo_modules):
    offenders = layer_violations(repo_modules)
    assert not offenders, _report(offenders, "imports against the layers")


def test_evaluation_is_lightning_and_tracker_free(repo_modules):
    offenders = evaluation_purity_violations(repo_modules)
    assert not offenders, _report(offenders, "forbidden imports in evaluation")


def test_no_private_names_across_modules(repo_modules):
    offenders = private_import_violations(repo_modules)
    assert not offenders, _report(offenders, "private names used across modules")


def test_third_party_private_apis_only_in_compat(repo_modules):
    offenders = third_party_private_violations(repo_modules)
    assert not offenders, _report(offenders, "third-party private APIs outside compat")


def test_modules_are_short(repo_modules):
    offenders = module_size_violations(repo_modules)
    assert not offenders, _report(offenders, "modules too long")


def test_functions_are_short(repo_modules):
    offenders = function_size_violations(repo_modules)
    assert not offenders, _report(offenders, "functions too long")


# --- the checkers catch what they should, on a fake package --------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> list[Module]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in FIRST_PARTY:
        (root / package).mkdir(exist_ok=True)
    return collect_modules(root)


CLEAN = {
    "metriclab/__init__.py": '"""doc"""\n',
    "metriclab/core/__init__.py": "",
    "metriclab/core/config.py": "import os\n\ndef build():\n    return os.sep\n",
    "metriclab/core/compat.py": "import mlflow.tracking._tracking_service.utils as u\nfrom torch import _C\nx = u._x\n",
    "metriclab/data/datasets.py": "from metriclab.core.config import build\nfrom ..core import config\n",
    "metriclab/models/extractors.py": "from metriclab.data import datasets\nfrom metriclab.core import constants\n"
                                      "from oml.const import Row\nrow = Row._make([])\n",  # namedtuple API
    "metriclab/evaluation/engine.py": "import numpy as np\nfrom metriclab.data.datasets import read\n",
    "metriclab/inference/index.py": "from metriclab.evaluation.engine import evaluate\n"
                                    "from metriclab.models import x\n",
    "metriclab/tracking/run.py": "import mlflow\nfrom metriclab.core import paths\nimport sys\nsys._getframe()\n",
    "metriclab/training/module.py": "import pytorch_lightning as pl\nfrom metriclab.tracking.run import tracked\n"
                                    "from metriclab.evaluation import engine\n",
    "metriclab/jobs/train.py": "from metriclab.training.module import M\nfrom converters import common\n"
                               "import converters.fruits\nfrom metriclab.core.atomic import __all__\n",
    "converters/__init__.py": "",
    "converters/common.py": "from metriclab.data.datasets import validate\nfrom metriclab.core import constants\n",
    "converters/fruits.py": "from __future__ import annotations\nfrom .common import helper\n",
}


def test_a_clean_fake_package_passes_every_checker(tmp_path):
    modules = _write(tmp_path, CLEAN)
    assert {m.name for m in modules} >= {"metriclab", "metriclab.core.compat", "converters.fruits"}
    assert layer_violations(modules) == []
    assert evaluation_purity_violations(modules) == []
    assert private_import_violations(modules) == []
    assert third_party_private_violations(modules) == []
    assert module_size_violations(modules) == []
    assert function_size_violations(modules) == []


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("metriclab/core/config.py", "from metriclab.data import datasets\n",
         ["metriclab/core/config.py:1: core imports metriclab.data (data); allowed: nothing of metriclab"]),
        ("metriclab/data/datasets.py", "from metriclab.models.extractors import build\n",
         ["metriclab/data/datasets.py:1: data imports metriclab.models.extractors (models); allowed: core"]),
        # function-level and relative imports count
        ("metriclab/data/datasets.py", "def f():\n    from ..training import module\n",
         ["metriclab/data/datasets.py:2: data imports metriclab.training (training); allowed: core"]),
        ("metriclab/tracking/run.py", "import metriclab.data.datasets\n",
         ["metriclab/tracking/run.py:1: tracking imports metriclab.data.datasets (data); allowed: core"]),
        ("metriclab/evaluation/engine.py", "from metriclab import tracking\n",
         ["metriclab/evaluation/engine.py:1: evaluation imports metriclab.tracking (tracking); allowed: core, data"]),
        ("metriclab/evaluation/engine.py", "from metriclab.models import losses\n",
         ["metriclab/evaluation/engine.py:1: evaluation imports metriclab.models (models); allowed: core, data"]),
        ("metriclab/inference/index.py", "from metriclab.training.module import M\n",
         ["metriclab/inference/index.py:1: inference imports metriclab.training.module (training); "
          "allowed: core, data, evaluation, models"]),
        ("metriclab/training/module.py", "from metriclab.jobs import train\n",
         ["metriclab/training/module.py:1: training imports metriclab.jobs (jobs); "
          "allowed: core, data, evaluation, models, tracking"]),
        ("metriclab/training/module.py", "from metriclab.inference import index\n",
         ["metriclab/training/module.py:1: training imports metriclab.inference (inference); "
          "allowed: core, data, evaluation, models, tracking"]),
        ("converters/common.py", "from metriclab.models import extractors\n",
         ["converters/common.py:1: converters imports metriclab.models (models); allowed: core, data"]),
        ("metriclab/data/datasets.py", "from converters import common\n",
         ["metriclab/data/datasets.py:1: data imports converters (converters); allowed: core"]),
        ("metriclab/models/extractors.py", "from metriclab.config import build\n",
         ["metriclab/models/extractors.py:1: imports metriclab.config, which is in no layer"]),
        ("metriclab/flat.py", "x = 1\n",
         ["metriclab/flat.py: module is in no layer (expected metriclab/<core|data|evaluation|inference|jobs|"
          "models|tracking|training>/)"]),
    ],
)
def test_layer_checker_catches(tmp_path, rel, text, expected):
    assert layer_violations(_write(tmp_path, {**CLEAN, rel: text})) == expected


def test_layer_checker_lists_every_offender(tmp_path):
    modules = _write(tmp_path, {**CLEAN, "metriclab/core/config.py": "import metriclab.jobs\n\n\ndef f():\n"
                                "    from metriclab.data import x\n",
                                "metriclab/data/datasets.py": "from metriclab.training import m\n"})
    assert [o.split(": ", 1)[0] for o in layer_violations(modules)] == [
        "metriclab/core/config.py:1", "metriclab/core/config.py:5", "metriclab/data/datasets.py:1"]


@pytest.mark.parametrize(
    ("statement", "where", "imported"),
    [("import pytorch_lightning as pl", 1, "pytorch_lightning"), ("from lightning.pytorch import Trainer", 1,
      "lightning.pytorch"), ("import mlflow.tracking", 1, "mlflow.tracking"), ("def f():\n    import neptune", 2,
      "neptune")],
)
def test_evaluation_purity_checker_catches(tmp_path, statement, where, imported):
    modules = _write(tmp_path, {**CLEAN, "metriclab/evaluation/pictures.py": statement + "\n"})
    assert evaluation_purity_violations(modules) == [
        f"metriclab/evaluation/pictures.py:{where}: evaluation imports {imported} {PURE}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("from metriclab.core.config import _flatten\n",
         ["metriclab/jobs/train.py:1: imports private _flatten from metriclab.core.config"]),
        ("from ..core.config import build, _flatten\n",
         ["metriclab/jobs/train.py:1: imports private _flatten from metriclab.core.config"]),
        ("from converters.common import _inspect\n",
         ["metriclab/jobs/train.py:1: imports private _inspect from converters.common"]),
        ("from metriclab.core import config\n\ndef f():\n    return config._flatten({})\n",
         ["metriclab/jobs/train.py:4: uses private metriclab.core.config._flatten"]),
    ],
)
def test_private_import_checker_catches(tmp_path, text, expected):
    assert private_import_violations(_write(tmp_path, {**CLEAN, "metriclab/jobs/train.py": text})) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("import mlflow.tracking._tracking_service.utils as u\n",
         "metriclab/tracking/run.py:1: private third-party API mlflow.tracking._tracking_service.utils"),
        ("from torch.nn.modules.batchnorm import _BatchNorm\n",
         "metriclab/tracking/run.py:1: private third-party API torch.nn.modules.batchnorm import _BatchNorm"),
        ("from oml.miners import inbatch_hard_tri as m\n\nm._sample_from_distmat(1)\n",
         "metriclab/tracking/run.py:3: private third-party API oml.miners.inbatch_hard_tri._sample_from_distmat"),
        ("import neptune\n\ndef f(run):\n    return neptune.handler._run_instance.x\n",
         "metriclab/tracking/run.py:4: private third-party API neptune.handler._run_instance"),
    ],
)
def test_third_party_private_checker_catches(tmp_path, text, expected):
    offenders = third_party_private_violations(_write(tmp_path, {**CLEAN, "metriclab/tracking/run.py": text}))
    assert offenders == [f"{expected} (only in {COMPAT})"]


def test_third_party_private_is_allowed_in_compat_only(tmp_path):
    text = CLEAN["metriclab/core/compat.py"]
    modules = _write(tmp_path, {**CLEAN, "metriclab/core/other.py": text})
    assert third_party_private_violations(modules) == [
        f"metriclab/core/other.py:1: private third-party API mlflow.tracking._tracking_service.utils "
        f"(only in {COMPAT})",
        f"metriclab/core/other.py:2: private third-party API torch import _C (only in {COMPAT})",
        f"metriclab/core/other.py:3: private third-party API mlflow.tracking._tracking_service.utils._x "
        f"(only in {COMPAT})",
    ]


def test_module_size_checker(tmp_path):
    modules = _write(tmp_path, {**CLEAN, "metriclab/core/long.py": "x = 1\n" * 401,
                                "metriclab/core/fits.py": "x = 1\n" * 400, "converters/long.py": "x = 1\n" * 401})
    assert module_size_violations(modules) == ["metriclab/core/long.py: 401 lines (limit 400)"]


def _function(n_lines: int, name: str = "f", above: str = "", first: str = "", doc: bool = False) -> str:
    """A function of exactly n_lines lines (def line included)."""
    head = [above] if above else []
    body = (['    """doc"""'] if doc else []) + ([f"    {first}"] if first else [])
    body += ["    x = 1"] * (n_lines - 1 - len(body))
    return "\n".join(head + [f"def {name}():"] + body) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_function(60), []),
        (_function(61), ["metriclab/core/config.py:1: f() is 61 lines (limit 60; or a comment saying why it "
                         "reads better whole)"]),
        (_function(61, above="# one state machine: it reads better whole"), []),
        (_function(61, first="# reads better whole: the steps share six locals"), []),
        (_function(61, doc=True, first="# reads better whole"), []),
        (_function(61, above="@decorator\n# reads better whole"), []),
        (_function(61, above="# reads better whole\n@decorator"), []),
        (_function(61, above="# a comment that says something else"),
         ["metriclab/core/config.py:2: f() is 61 lines (limit 60; or a comment saying why it reads better whole)"]),
        ("class C:\n" + "".join("    " + line + "\n" for line in _function(62, name="m").splitlines()),
         ["metriclab/core/config.py:2: m() is 62 lines (limit 60; or a comment saying why it reads better whole)"]),
    ],
)
def test_function_size_checker(tmp_path, text, expected):
    assert function_size_violations(_write(tmp_path, {**CLEAN, "metriclab/core/config.py": text})) == expected
