"""The layout's promises, checked: pure modules stay pure, and no module keeps mutable state at import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "gateway"

# The folders whose modules are pure: no framework, no event loop, no metrics library. Each is
# what the request path asks (policy), what it is configured with (config), or the lease protocol
# (heartbeat), so each can be tested with values in and decisions out.
PURE_FOLDERS = ("config", "policy", "heartbeat")
# The heartbeat package's I/O shell, which drives its sans-IO core (as httpcore drives h11): the driver carries
# out the core's actions, and the sender makes each flight's upstream call.
SHELLS = {"heartbeat/driver.py", "heartbeat/sending.py"}
# Pure modules outside those folders: the gateway's errors, and the simulator's model of the API.
PURE_MODULES = (
    "errors.py",
    "simulator/control_plane.py",
    "simulator/sessions.py",
    "simulator/auth.py",
    "simulator/faults.py",
)
PURE = sorted(
    {str(p.relative_to(PACKAGE)) for folder in PURE_FOLDERS for p in (PACKAGE / folder).glob("*.py")} - SHELLS
    | set(PURE_MODULES)
)
IO_LIBRARIES = {"aiohttp", "asyncio", "prometheus_client", "yarl", "multidict", "socket", "anyio"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    assert imported_roots(PACKAGE / module) & IO_LIBRARIES == set()


# The libraries a pure module must not load even indirectly (`socket` is left out: the standard library's
# own `email.utils`, under `importlib.metadata`, imports it).
FRAMEWORKS = sorted(IO_LIBRARIES - {"socket"})


def test_importing_the_pure_modules_loads_no_io_library() -> None:
    """What each imports, all the way down: a pure module importing an I/O one of the gateway's own would pass
    the check above (it sees only `gateway`), and drag aiohttp in all the same."""
    modules = [
        "gateway." + m.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for m in PURE
        if "simulator" not in m
    ]
    code = (
        "import importlib, sys; importlib.import_module(sys.argv[1]); "
        "print(sorted(set(sys.argv[2:]) & {m.split('.')[0] for m in sys.modules}))"
    )
    loaded = {
        module: subprocess.run(
            [sys.executable, "-c", code, module, *FRAMEWORKS], capture_output=True, text=True, check=True
        ).stdout.strip()
        for module in modules
    }
    assert {m: libs for m, libs in loaded.items() if libs != "[]"} == {}


def test_coverage_measures_exactly_the_pure_modules() -> None:
    """`make coverage` holds the pure code to its floor: the folders above, every module in them."""
    run = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["coverage"]["run"]
    measured = {
        str(p.relative_to(PACKAGE))
        for pattern in run["include"]
        for p in PACKAGE.parent.glob(pattern)
        if p.name != "__init__.py"
    } - {str(Path(p).relative_to("gateway")) for p in run.get("omit", [])}
    assert sorted(measured) == [m for m in PURE if not m.endswith("__init__.py")]


def test_only_the_upstream_client_knows_aiohttp_client_errors() -> None:
    """Foreign errors are translated in one place: no other module names aiohttp's client errors,
    whether to catch them or to test for them."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "aiohttp"
                and node.attr.endswith("Error")
            ):
                offenders.append(str(path.relative_to(PACKAGE)))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp.client"):
                offenders.append(str(path.relative_to(PACKAGE)))
    # The demo's workers are clients of the gateway, not the gateway's upstream path.
    assert sorted(set(offenders) - {"demo/worker.py"}) == ["upstream/client.py"]


def test_no_module_level_mutable_state() -> None:
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, mutable):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [ast.unparse(t) for t in targets]
                if names != ["__all__"]:
                    offenders.append(f"{path.relative_to(PACKAGE)}: {', '.join(names)}")
    assert offenders == []


def test_one_composition_root() -> None:
    """Only app.py builds the proxy's parts; handlers receive them through the app."""
    builders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "HttpUpstream(" in text and path.relative_to(PACKAGE) != Path("upstream/client.py"):
            builders.append(str(path.relative_to(PACKAGE)))
    assert builders == ["app.py"]


def test_tasks_are_spawned_only_through_their_owner() -> None:
    """No bare `create_task`: `gateway.tasks.Tasks` holds each task until done; a TaskGroup owns its own.

    ruff bans `asyncio.create_task`; this also catches `loop.create_task` and
    `get_running_loop().create_task`, which ruff cannot see through.
    """
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE) == Path("tasks.py"):
            continue
        tree = ast.parse(path.read_text())
        groups = {
            item.optional_vars.id
            for node in ast.walk(tree)
            if isinstance(node, ast.AsyncWith)
            for item in node.items
            if isinstance(item.optional_vars, ast.Name) and "TaskGroup" in ast.unparse(item.context_expr)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("create_task", "ensure_future"):
                continue
            receiver = node.func.value
            if not (isinstance(receiver, ast.Name) and receiver.id in groups):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_serving_never_loads_the_simulator_or_the_demo() -> None:
    """`serve` in production imports only the gateway: the simulator's code is not even loaded."""
    code = "import sys, gateway.cli; print(sorted(m for m in sys.modules if m.startswith('gateway.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = ast.literal_eval(out)
    assert [m for m in loaded if m.startswith(("gateway.simulator", "gateway.demo"))] == []


def test_the_readme_architecture_names_every_folder_and_top_level_module() -> None:
    """The layout is documented where a newcomer looks: each folder (its own `__init__.py` says what is in
    it) and each module at the top of the package."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    folders = [p.name + "/" for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").exists()]
    top = [p.name for p in sorted(PACKAGE.glob("*.py")) if p.name not in ("__init__.py", "__main__.py")]
    assert [name for name in folders + top if f"`{name}`" not in section] == []
    inits = PACKAGE.glob("*/__init__.py")
    assert [p.parent.name for p in inits if not ast.get_docstring(ast.parse(p.read_text()))] == []


def test_every_module_is_checked_by_a_test_file_that_names_it() -> None:
    """Tests mirror the code: each module has test files that say, in their docstring, that they check it
    ("Checks `gateway/policy/routing.py`."), and no test file names a module that is gone."""
    tests = PACKAGE.parent / "tests"
    named: dict[str, list[str]] = {}
    for path in sorted(tests.glob("test_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for module in re.findall(r"`gateway/([\w/]+\.py)`", doc):
            named.setdefault(module, []).append(path.name)
    modules = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
    }
    assert sorted(modules - set(named)) == [], "modules no test file says it checks"
    assert sorted(set(named) - modules) == [], "test files naming modules that do not exist"
