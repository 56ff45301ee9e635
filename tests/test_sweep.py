"""What a killed writer leaves behind is swept by the next run (under its lock)."""

from __future__ import annotations

from fmn.io import atomic_dir, atomic_path
from fmn.run.folder import sweep_stale_temp


def test_sweep_removes_only_the_leftovers_of_atomic_writes(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "patches" / "cat").mkdir(parents=True)
    kept = [run / "patches" / "cat" / "delta.safetensors", run / ".lock", run / "a.tmp"]
    for f in kept:
        f.write_text("x")
    # leftovers as a SIGKILL mid-write leaves them: a temp file and a temp folder
    left = [
        run / "patches" / "cat" / ".delta.safetensors.k2j3.tmp",
        run / ".merged.x9y8.tmp",
        run / ".merged.old.4242",
    ]
    left[0].write_text("half")
    left[1].mkdir()
    (left[1] / "model").mkdir()
    left[2].mkdir()
    removed = sweep_stale_temp(run)
    assert sorted(removed) == sorted(left)
    assert all(f.exists() for f in kept) and not any(p.exists() for p in left)


def test_atomic_writes_name_their_temps_so_the_sweep_finds_them(tmp_path) -> None:
    seen = []
    with atomic_path(tmp_path / "x.json") as tmp:
        seen.append(tmp)
    with atomic_dir(tmp_path / "report") as tmp:
        seen.append(tmp)
    names = [p.name for p in seen]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in names), names
