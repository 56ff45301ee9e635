"""fmn/ is grouped by job with the CLI on top: no import circles, no Prefect below the
CLI face, and each package's modules reach only the layers beneath them."""

from __future__ import annotations

import pkgutil

import fmn
from fmn.code_key import SOURCE_ROOT, closure, module_file


def _modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(fmn.__path__, "fmn.")]
    return [m for m in found if module_file(m) is not None]


def _circles() -> list[tuple[str, str]]:
    """Pairs of modules each of which imports the other, directly or through others
    (every import statement counts, also those inside functions or TYPE_CHECKING). A
    package and its own modules are no pair: its __init__ runs before them by Python's
    rules, and re-exporting them is not an import they make of it."""
    mods = _modules()
    reach = {m: set(closure(m)) - {m} for m in mods}
    return sorted(
        {
            tuple(sorted((a, b)))
            for a in mods
            for b in reach[a]
            if a in reach.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))
        }
    )


def test_there_are_no_import_circles() -> None:
    assert _circles() == []


def test_only_the_cli_face_imports_prefect() -> None:
    allowed = {"fmn.cli", "fmn.cli_run"}
    for m in _modules():
        text = module_file(m).read_text()
        if "prefect" in text.replace("Prefect", "") and m not in allowed:
            assert "import prefect" not in text and "from prefect" not in text, m


def test_lower_layers_never_reach_up() -> None:
    """Layers, bottom to top: model -> data -> train -> merge -> eval -> run -> CLI. The
    world is an instrument the evaluation uses; the library never reaches into the run
    folder machinery or the CLI."""
    order = ["model", "data", "train", "merge", "eval", "run"]
    for m in _modules():
        parts = m.split(".")
        if len(parts) < 3 or parts[1] not in order:
            continue
        level = order.index(parts[1])
        for dep in closure(m):
            dparts = dep.split(".")
            if len(dparts) >= 3 and dparts[1] in order:
                assert order.index(dparts[1]) <= level, f"{m} reaches up to {dep}"
            assert dep not in {"fmn.cli", "fmn.cli_run"}, f"{m} imports the CLI ({dep})"
    assert SOURCE_ROOT.joinpath("fmn", "manifest").is_dir()
