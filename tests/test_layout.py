"""The package layout: sub-packages import only downwards (cli -> tools -> dense -> eval -> train -> export ->
models, data -> config, runtime), and the public names of ``conmim`` stay importable."""

from __future__ import annotations

import ast
from pathlib import Path

import conmim

PACKAGE = Path(conmim.__file__).parent
LEVEL = {
    "config": 0,
    "runtime": 0,
    "models": 1,
    "data": 1,
    "export": 2,
    "train": 3,
    "eval": 4,
    "dense": 5,
    "tools": 6,
    "cli": 7,
}


def _part_of(module: str) -> str | None:
    """``conmim.<part>...`` -> part (a sub-package or a top-level module), None outside conmim."""
    parts = module.split(".")
    return parts[1] if parts[0] == "conmim" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    """Absolute names of the conmim modules that ``path`` imports (relative imports resolved)."""
    here = ["conmim", *path.relative_to(PACKAGE).with_suffix("").parts]
    if here[-1] == "__init__":
        here = here[:-1] + ["__init__"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: -node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.startswith("conmim")}


def test_every_module_imports_only_downwards():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        mine = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if mine == "__init__":
            continue
        for name in _imports(path):
            other = _part_of(name)
            if other is None or other == mine or other == "__init__":
                continue
            if LEVEL[other] >= LEVEL[mine]:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_public_names_and_sub_packages():
    for name in conmim.__all__:
        assert getattr(conmim, name) is not None
    spec = conmim.timm_spec("vit_tiny", 16, 4, depth=1)
    assert spec["model_name"] and callable(conmim.load_encoder)
    for sub in ("runtime", "models", "data", "train", "eval", "export", "dense", "tools"):
        assert (PACKAGE / sub / "__init__.py").is_file()


def test_method_references_name_existing_sections():
    """Every ``docs/method.md §N`` (and the ``§N`` right after it in one reference) names a section of it."""
    import re

    root = PACKAGE.parent
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (root / "docs" / "method.md").read_text(), re.M)
    sections = {h.rstrip(".") for h in headings}
    files = [
        *PACKAGE.rglob("*.py"),
        *PACKAGE.rglob("*.yaml"),
        *(root / "tests").rglob("*.py"),
        *(root / "docs").glob("*.md"),
        root / "README.md",
    ]
    wrong = []
    for path in files:
        for ref in re.findall(r"method\.md\)?`?((?:,? ?§\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?)+)", path.read_text()):
            for number in re.findall(r"\d+(?:\.\d+)?", ref):
                if number not in sections:
                    wrong.append(f"{path.relative_to(root)}: §{number}")
    assert sections and not wrong, wrong


def test_model_fields_are_spelled_once_in_the_configuration():
    """Every model field reaches ConMIM's constructor by name, and the export spec and the models agree."""
    import dataclasses
    import inspect

    from conmim.config import Config, ModelConfig
    from conmim.export.encoders import spec_of
    from conmim.models import pretraining_model
    from conmim.models.conmim import ConMIM, kwargs_from
    from conmim.models.mae import MAE

    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"objective", "init"}  # what to build / load
    decoder = {"decoder_depth", "decoder_dim", "decoder_heads", "norm_pix_loss"}  # the MAE baseline's own
    assert fields - decoder == set(inspect.signature(ConMIM).parameters)
    assert decoder < set(inspect.signature(MAE).parameters) <= fields
    cfg = Config()
    cfg.model = ModelConfig(arch="vit_tiny", depth=2, img_size=32, patch_size=8, drop_path=0.2, pos_embed="sincos")
    assert kwargs_from(ConMIM, cfg.model)["drop_path"] == 0.2
    for objective in ("conmim", "pixel"):
        cfg.model.objective = objective
        model = pretraining_model(cfg.model)
        assert model.spec == spec_of(cfg) and spec_of(cfg)["kwargs"]["drop_path_rate"] == 0.0
        assert spec_of(cfg)["kwargs"]["use_abs_pos_emb"] and spec_of(cfg)["kwargs"]["depth"] == 2
    cfg.model.objective, cfg.model.encoder, cfg.model.pos_embed = "mae", "vit", "none"
    assert pretraining_model(cfg.model).spec == spec_of(cfg)


def _module_of(name: str, modules: set[str]) -> str | None:
    """The conmim module an imported name is: ``conmim.data.sources`` itself, or the package of
    ``conmim.cli.main`` (``from . import main`` in its ``__main__``); None for a module that does not exist."""
    if name in modules:
        return name
    package = name.rpartition(".")[0]
    return package if (PACKAGE.parent / package.replace(".", "/") / "__init__.py").is_file() else None


def test_no_import_cycles_inside_the_package():
    """No two conmim modules import each other, directly or through others: every import counts,
    at module level, inside a function or under ``TYPE_CHECKING`` (all of them are in ``_imports``)."""
    paths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["conmim", *path.relative_to(PACKAGE).with_suffix("").parts]
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph, missing = {}, []
    for module, path in paths.items():
        found = {name: _module_of(name, set(paths)) for name in _imports(path)}
        missing += [f"{path.relative_to(PACKAGE.parent)} imports {name}" for name, m in found.items() if m is None]
        graph[module] = sorted({m for m in found.values() if m not in (None, module)})
    assert not missing, "imports of no conmim module:\n" + "\n".join(sorted(missing))
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in graph:  # depth-first, without recursion: each back edge closes one cycle
        if state[start]:
            continue
        state[start], path, todo = 1, [start], [iter(graph[start])]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state[nxt] == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(graph[nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_package_never_imports_the_lab_and_no_module_is_long():
    """The lab (``lab/``: studies, diagnostics, records) imports conmim, never the reverse; short modules."""
    root = PACKAGE.parent
    wrong = [
        f"{path.relative_to(root)} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.split(".")[0] == "lab"
    ]
    assert not wrong, "\n".join(wrong)
    long = [
        f"{path.relative_to(root)}: {n} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > 450
    ]
    assert not long, "modules over 450 lines:\n" + "\n".join(long)


def test_the_built_wheel_holds_the_package_and_its_presets_but_no_lab(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = PACKAGE.parent
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("conmim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "conmim/cli/__main__.py" in names and "conmim/configs/fashion_mnist.yaml" in names
    assert not [n for n in names if n.startswith(("lab/", "tests/", "examples/", "benchmarks/"))]
    assert not [n for n in names if "study" in n or "report" in n], names
