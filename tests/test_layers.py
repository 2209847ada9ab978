"""The layers' import rules, checked on the source: client and server never import each other,
shared imports neither, none of the three imports the simulation or the command line; every
import of the project goes through the one ``fedmets.*`` namespace; the long-lived processes
start without the image libraries; docs/architecture.md names every module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "shared": {"fedmets.client", "fedmets.server", "fedmets.simulation", "fedmets.cli"},
    "client": {"fedmets.server", "fedmets.simulation", "fedmets.cli"},
    "server": {"fedmets.client", "fedmets.simulation", "fedmets.cli"},
}
OLD_NAMES = {"shared", "client", "server", "simulation"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``path``, anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def breaches(layer: str) -> list[str]:
    """``file:line module`` of each import in ``layer`` that its rules forbid."""
    out = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                out.append(f"{path.relative_to(ROOT)}:{line} {module}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_follow_the_rules(layer: str) -> None:
    assert breaches(layer) == []


def test_the_check_sees_a_breach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "bad.py").write_text("def f():\n    from fedmets.server import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert breaches("client") == ["client/bad.py:2 fedmets.server"]


def test_no_import_uses_the_old_top_level_names() -> None:
    sources = [
        p for d in ("fedmets", *OLD_NAMES, "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")
    ]
    old = [
        f"{path.relative_to(ROOT)}:{line} {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module.split(".")[0] in OLD_NAMES
    ]
    assert old == []


def test_every_module_of_the_layers_is_in_the_architecture_table() -> None:
    """docs/architecture.md's table names each module (``fedmets.<layer>.<module>``; the
    simulation row names them bare, in backticks), so the next engineer finds its role."""
    table = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [
        (layer, path.stem if path.suffix else path.name)
        for layer in sorted(OLD_NAMES)
        for path in (ROOT / layer).iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    ]
    assert len(modules) > 60
    unnamed = [
        f"fedmets.{layer}.{name}"
        for layer, name in modules
        if f"fedmets.{layer}.{name}`" not in table
        and not (layer == "simulation" and f"`{name}`" in table)
    ]
    assert unnamed == []


def test_only_the_fedmets_namespace_is_importable_outside_the_checkout(tmp_path: Path) -> None:
    def outcome(module: str) -> str:
        code = f"import {module}; print('ok', {module}.__name__)"
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
        )
        return done.stdout.strip() or done.stderr.strip().splitlines()[-1]

    for layer in sorted(OLD_NAMES):
        assert outcome(layer) == f"ModuleNotFoundError: No module named '{layer}'"
        assert outcome(f"fedmets.{layer}") == f"ok fedmets.{layer}"
    assert outcome("fedmets.cli") == "ok fedmets.cli"


def modules_loaded(imports: str, names: set[str]) -> list[str]:
    """Of ``names`` (packages or modules), those a fresh interpreter holds after ``import
    imports`` (comma-separated)."""
    code = f"import sys, {imports}\nprint([n for n in {sorted(names)!r} if n in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(done.stdout.strip())


@pytest.mark.slow
def test_the_server_app_and_the_site_service_start_without_the_image_libraries() -> None:
    """A deployed run starts a ServerApp process, and a site its service, for every run or
    restart: neither loads MONAI, PyRadiomics, SimpleITK, matplotlib or Opacus until an image,
    extraction, figure or DP route needs them (the presets live in
    ``fedmets.shared.image_presets``, apart from the networks)."""
    heavy = {"monai", "radiomics", "SimpleITK", "matplotlib", "opacus"}
    assert modules_loaded("fedmets.server.server_app, fedmets.client.site_service", heavy) == []


def test_a_hospitals_approval_plans_the_run_without_torch() -> None:
    """``fedmets site approve`` checks a run against the site's policy from the run's plan
    (``fedmets.shared.run_plan``): the models' names live apart from the networks
    (``fedmets.shared.model_names``), so planning loads neither torch nor scikit-learn."""
    imports = "fedmets.client.approval, fedmets.shared.run_plan, fedmets.client.policy"
    assert modules_loaded(imports, {"torch", "sklearn", "monai"}) == []
