"""Code keys: a hash of the fmn source behind a cached result, computed from the imports.

A cached result (a build stage's output, a prep cache entry) must be remade when the code
that makes it changes, and only then. `code_key(root)` hashes the source of every fmn
module in the static import closure of `root`:

- `"fmn.data.prepare"`: the module, every fmn module its import statements name (anywhere:
  at the top, inside functions, under `if TYPE_CHECKING`), theirs, and so on;
- `"fmn.run.stages.concept:stage_prepare"`: one function of a module. The module's own source
  and top-level imports count, but of its functions only this one and those it names
  (helpers of the same module) have their imports followed, so the prepare stage does not
  depend on the re-steering code that stage_resteer, in the same file, imports. A name
  the module only imports is looked up where it comes from: `"fmn.run.stages:stage_prepare"`
  is the same root, found without importing anything.

`from fmn.x import y` counts `fmn.x.y` when that is a module, else `fmn.x`. Packages'
`__init__.py` files count (they run before any module in them), but their own imports are
followed only when the package itself provides an imported name: `fmn/run/stages/__init__.py`
re-exports every stage, and following it from each stage would tie every stage to every
other stage's code.

Nothing here imports the modules it hashes; only fmn modules are followed (a new version
of torch or diffusers does not change a key).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

TOP = __name__.split(".")[0]  # the package whose modules are followed: "fmn"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds fmn/

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def module_file(name: str, src: Path | None = None) -> Path | None:
    """The source file of module `name` under `src` (a package's `__init__.py`), found
    without importing it; None when `name` is no module file (an attribute, a folder
    without `__init__.py`)."""
    path = Path(src or SOURCE_ROOT).joinpath(*name.split("."))
    for f in (path.with_suffix(".py"), path / "__init__.py"):
        if f.is_file():
            return f
    return None


def source_key(modules: Iterable[str], src: Path | None = None) -> str:
    """Hash of these modules' names and source files under `src` (SOURCE_ROOT by
    default): the same wherever the tree lies, so a moved checkout keeps its caches."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        path = module_file(name, src)
        if path is None:
            raise ModuleNotFoundError(f"no source file for {name} under {src or SOURCE_ROOT}")
        text = path.read_bytes()
        h.update(f"{name}\0{len(text)}\0".encode() + text)
    return "sha256:" + h.hexdigest()


def closure(root: str, src: Path | None = None) -> tuple[str, ...]:
    """The fmn modules whose source `code_key(root)` hashes, sorted (see the module
    docstring for what `root` may be)."""
    return _closure(root, Path(src or SOURCE_ROOT))


def code_key(root: str, src: Path | None = None) -> str:
    """Hash of the source of every fmn module in the static import closure of `root`
    (a module, or `module:function`), computed once per process and source tree.

    Static (ast), not the modules a process has imported (`sys.modules`): that set
    depends on what else the process did before (which stages ran, in which order, in a
    flow process or a Dask worker), so one stage's key would change from run to run
    without any code change; it would hold every module any stage imported, tying each
    stage to all of fmn; and it would miss the modules a stage imports lazily when it
    runs, after its key has been computed (fmn.train.judge in the merge). The import
    statements in the files are the same for every process and machine.

    Once per process (per source tree: tests point `src` or SOURCE_ROOT at a copy): a
    process keeps running the code it has imported, so a key read again after a mid-run
    edit would describe code that is not what runs."""
    return _code_key(root, Path(src or SOURCE_ROOT))


@cache
def _code_key(root: str, src: Path) -> str:
    return source_key(_closure(root, src), src)


@cache
def _closure(root: str, src: Path) -> tuple[str, ...]:
    module, _, function = root.partition(":")
    if module_file(module, src) is None:
        raise ModuleNotFoundError(f"no source file for {module} under {src}")
    if function:  # the module's own source, the imports of its top level and the function
        module, function = _definition(module, function, src)
        todo = _function_imports(module, function, src)
        hashed = {module, *_parents(module)}
    else:
        todo, hashed = {module}, set()
    followed: set[str] = set()
    while todo:
        name = todo.pop()
        followed.add(name)
        hashed |= {name, *_parents(name)}
        todo |= _imports(name, src) - followed
    return tuple(sorted(m for m in hashed if module_file(m, src) is not None))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _parse(name: str, src: Path) -> ast.Module:
    path = module_file(name, src)
    return ast.parse(path.read_bytes(), filename=str(path))


@cache
def _imports(name: str, src: Path) -> frozenset[str]:
    """The fmn modules named by the import statements anywhere in module `name`."""
    return _named(_parse(name, src), name, src)


def _definition(module: str, function: str, src: Path) -> tuple[str, str]:
    """(module, name) where `module`'s `function` is defined: itself, or, for a name its
    top level imports (a package's re-export: fmn.run.stages:stage_prepare), where it came
    from."""
    tree = _parse(module, src)
    if any(isinstance(n, _FUNCTIONS) and n.name == function for n in tree.body):
        return module, function
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == function:
                    return _definition(_absolute(node, module, src), alias.name, src)
    raise ValueError(f"{module} has no top-level function {function!r}")


def _function_imports(module: str, function: str, src: Path) -> set[str]:
    """The fmn modules imported by `module`'s top level, by its `function` and by the
    module's other functions that those name (transitively)."""
    tree = _parse(module, src)
    defs = {n.name: n for n in tree.body if isinstance(n, _FUNCTIONS)}
    top = ast.Module(body=[n for n in tree.body if not isinstance(n, _FUNCTIONS)], type_ignores=[])
    found = set(_named(top, module, src))
    todo, seen = {function} | (_names(top) & defs.keys()), set()
    while todo:
        fn = todo.pop()
        seen.add(fn)
        found |= _named(defs[fn], module, src)
        todo |= (_names(defs[fn]) & defs.keys()) - seen
    return found


def _names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _named(tree: ast.AST, module: str, src: Path) -> frozenset[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, src)
            subs = {f"{base}.{a.name}" for a in node.names}
            subs = {n for n in subs if module_file(n, src) is not None}
            found |= subs
            if len(subs) < len(node.names):  # names the package itself provides
                found.add(base)
    return frozenset(n for n in found if n.split(".")[0] == TOP and module_file(n, src) is not None)


def _absolute(node: ast.ImportFrom, module: str, src: Path) -> str:
    """The absolute module name of a `from ... import` (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if module_file(module, src).name != "__init__.py":
        package = package[:-1]  # a module's imports are relative to its package
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])
