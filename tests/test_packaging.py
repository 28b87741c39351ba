"""Packaging: `augkd.ops` runs with torch alone, and every third-party import of the package is declared
in pyproject.toml (core dependencies or the `method` extra)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

from augkd.config import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# top-level import name -> distribution name, for the method's dependencies
METHOD_ONLY = {"sklearn": "scikit-learn", "mlxtend": "mlxtend", "PIL": "pillow", "matplotlib": "matplotlib",
               "tqdm": "tqdm", "yaml": "pyyaml", "safetensors": "safetensors"}
# imports that need no declaration of their own
BROUGHT_BY_TORCH = {"torch", "triton"}
OPTIONAL = {"torchvision": "vision", "tomli": "method"}  # tomli: Python < 3.11 only

BLOCKED_RUN = textwrap.dedent("""
    import sys
    BLOCKED = set(sys.argv[1].split(","))
    # None in sys.modules is how Python marks a module as absent: `import` raises ModuleNotFoundError and
    # importlib.util.find_spec answers None, exactly as when the package is not installed
    for name in BLOCKED:
        sys.modules[name] = None
    try:
        import tqdm  # the finder must work, or the check below proves nothing
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker did not block tqdm")
    import torch
    import augkd.ops as o
    loss = o.kd_loss(torch.randn(4, 5), torch.randn(4, 5))
    assert loss.shape == () and torch.isfinite(loss), loss
    print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None))
""")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_ops_run_without_the_method_dependencies():
    res = _run(BLOCKED_RUN, ",".join(METHOD_ONLY))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok []"


def test_importing_ops_imports_none_of_the_method_dependencies():
    """With them installed, too: nothing beyond what `import torch` itself loads (torch.hub takes tqdm when
    it is there)."""
    code = textwrap.dedent(f"""
        import sys
        mine = lambda: {{m for m in sys.modules if m.split(".")[0] in {set(METHOD_ONLY)!r}}}
        import torch
        by_torch = mine()
        import augkd.ops
        augkd.ops.kd_loss(torch.randn(4, 5), torch.randn(4, 5))
        print(sorted(mine() - by_torch))
    """)
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module name -> the files of augkd/ that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "augkd")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as fh:
                tree = ast.parse(fh.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for mod in names:
                    top = mod.split(".")[0]
                    if top != "augkd" and top not in sys.stdlib_module_names and top != "__future__":
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower())
    return names


def test_dependencies_are_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    core = _requirement_names(project["dependencies"])
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    assert set(METHOD_ONLY.values()) <= extras["method"]
    assert not core & set(METHOD_ONLY.values()), "a method dependency is a core dependency"
    for module, files in sorted(_third_party_imports().items()):
        if module in BROUGHT_BY_TORCH:
            continue
        if module in METHOD_ONLY:
            assert METHOD_ONLY[module] in extras["method"], (module, files)
        elif module in OPTIONAL:
            assert module in extras[OPTIONAL[module]], (module, files)
        else:
            assert module in core, f"{module} (imported by {sorted(files)}) is not a declared dependency"


@pytest.mark.parametrize("blocked", ["tqdm", "sklearn"])
def test_blocked_run_fails_when_ops_needs_a_blocked_module(blocked, tmp_path):
    """The blocking subprocess can fail: a package whose import pulls a blocked module is reported."""
    pkg = tmp_path / "needs_it"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"import {blocked}\n")
    code = BLOCKED_RUN.replace("import augkd.ops as o", "import needs_it; import augkd.ops as o")
    res = subprocess.run([sys.executable, "-c", code, ",".join(METHOD_ONLY)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode != 0 and f"import of {blocked} halted" in res.stderr
