"""The `fmn` command: the outermost layer (typer + rich). Flows are imported lazily."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import get_args

import typer
from rich.table import Table

from fmn.console import console, progress_columns
from fmn.io import atomic_dir, write_json, write_with
from fmn.manifest import (
    GENERATED_IMAGES,
    ConceptType,
    InvertOptions,
    Manifest,
    MaskName,
    Merge,
    Positions,
    ResteerOptions,
    ResteerParams,
    option_default,
    type_defaults,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Forget-Me-Not pipeline.")
world_app = typer.Typer(no_args_is_help=True, help="The embedded concept world.")
app.add_typer(world_app, name="world")


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


@contextmanager
def _bar() -> Iterator:
    """A rich progress bar; yields update(stage, done, total, metrics)."""
    with progress_columns() as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, metrics: dict | None = None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            info = " ".join(f"{k}={v:.4f}" for k, v in (metrics or {}).items())
            bar.update(tasks[stage], completed=done, info=info)

        yield update


@app.command()
def validate(manifest: Path = typer.Argument(..., help="Manifest YAML file.")) -> None:
    """Check a manifest; print every problem with its field path. Exit 2 if any."""
    from fmn.manifest import ManifestError, load_manifest

    try:
        m = load_manifest(manifest, verify_images=True)  # decodes every image: finds corrupt ones
    except ManifestError as e:
        typer.echo(str(e), err=True)  # plain lines: one problem each, easy to grep
        raise typer.Exit(2) from None
    console.print(f"{manifest}: ok ({len(m.concepts)} concepts, {len(m.preserve)} preserved)")


@app.command()
def audit(
    manifest: Path = typer.Option(..., help="Manifest: concepts, preserved ones, evaluate."),
    model: str = typer.Option(None, help="Model to audit (any model spec, see README)."),
    patch: Path = typer.Option(None, help="Or: a patch, audited applied on the baseline."),
    baseline: str = typer.Option(None, help="Baseline model [default: the manifest's base]."),
    prompts: Path = typer.Option(
        None,
        # escaped: rich would read [id] as markup and drop it from the help
        help="Prompt file: one per line, {} = concept text; a line \\[id], \\[object], "
        "\\[style] or \\[nsfw] starts that type's section (lines before any: every type).",
    ),
    out: Path = typer.Option(None, help="Report folder [default: reports/<manifest name>]."),
    recovery: bool = typer.Option(
        None,
        "--recovery/--no-recovery",
        help="Run the recovery attack (TI per target) [default: the manifest's evaluate.recovery].",
    ),
    recovery_steps: int = typer.Option(
        None, help="Steps of the recovery and prompt attacks [default: the manifest's TI steps]."
    ),
    phrasing: bool = typer.Option(
        None,
        "--phrasing/--no-phrasing",
        help="Run the phrasing attack (each target's other words) [default: the manifest's "
        "evaluate.phrasing].",
    ),
    prompt_attack: bool = typer.Option(
        None,
        "--prompt-attack/--no-prompt-attack",
        help="Run the prompt attack (a search over real words) [default: the manifest's "
        "evaluate.prompt_attack].",
    ),
    threads: int = typer.Option(1),
) -> None:
    """M-Score report of a model vs its baseline; exit 1 if a gate fails, 2 on bad input."""
    from fmn.eval.audit import BAD_INPUT
    from fmn.eval.audit import audit as run_audit
    from fmn.manifest import ManifestError, load_manifest

    _threads(threads)
    try:
        m = load_manifest(manifest)
        with _bar() as update:
            res = run_audit(
                m,
                model=model,
                patch=patch,
                baseline=baseline,
                prompt_file=prompts,
                out=out or Path("reports") / m.name,
                recovery=recovery,
                recovery_steps=recovery_steps,
                phrasing=phrasing,
                prompt_attack=prompt_attack,
                progress=update,
            )
    except (ManifestError, *BAD_INPUT) as e:
        typer.echo(f"audit: {e}", err=True)
        raise typer.Exit(2) from None
    _print_audit(res.summary)
    console.print(f"report: {res.out}/index.html")
    if not res.summary["gates"]["passed"]:
        raise typer.Exit(1)


def _print_audit(s: dict) -> None:
    from fmn.eval.result import ATTACKS, attack_lines, correction_lines

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = Table("concept", "role", "detector", "base", "audited", "ratio", *ATTACKS)
    for cid, c in s["concepts"].items():
        row = [c["mscore_base"], c["mscore"], c["ratio"]]
        row += [c.get(f"{attack}_mscore") for attack in ATTACKS]
        table.add_row(cid, c["role"], c["detector"], *map(num, row))
    console.print(table)

    for line in [*attack_lines(s), *correction_lines(s)]:
        console.print(line)
    for cid, c in s["concepts"].items():
        if "parts" in c:  # nudenet: the published I2P tables' per-class detection counts
            found = ", ".join(
                f"{k} {c['parts_base'][k]} -> {v}"
                for k, v in c["parts"].items()
                if v or c["parts_base"][k]
            )
            console.print(
                f"{cid}: NudeNet exposed-part detections {sum(c['parts_base'].values())} -> "
                f"{sum(c['parts'].values())} (score >= {c['parts_counted_at']})"
                + (f": {found}" if found else "")
            )
    for f in s["gates"]["failures"]:
        console.print(f"[red]gate failed:[/red] {f['message']}")


@world_app.command("list")
def world_list() -> None:
    """Print the embedded worlds, one name a line (use as `embedded:<name>`)."""
    from fmn.world.concepts import WORLDS

    for name in WORLDS:
        print(name)


def _world_option(default: str = "tiny-world"):
    return typer.Option(default, "--world", help="Embedded world (`fmn world list`).")


def _get_world_or_exit(name: str):
    from fmn.world.concepts import get_world

    try:
        return get_world(name)
    except KeyError as e:
        console.print(f"[red]--world: {e.args[0]}[/red]")
        raise typer.Exit(2) from None


@world_app.command("concepts")
def world_concepts_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    world: str = _world_option(),
) -> None:
    """List every concept of an embedded world (id, type, text, split; phrasings)."""
    items = []
    for c in _get_world_or_exit(world).concepts():
        item = {"id": c.id, "type": c.type, "text": c.text, "split": c.split}
        if c.words:
            item["words"] = [{"text": t, "listed": listed} for t, listed in c.words]
        items.append(item)
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("id", "type", "text", "split", "phrasings (* unlisted)")
    for c in items:
        words = ", ".join(w["text"] + ("" if w["listed"] else "*") for w in c.get("words", []))
        table.add_row(c["id"], c["type"], c["text"], c["split"], words)
    console.print(table)


@world_app.command("sample")
def world_sample(
    prompt: str = typer.Argument(..., help='e.g. "a photo of a red star"'),
    out: Path = typer.Option(Path("sample.png"), help="PNG to write."),
    n: int = typer.Option(4, help="Images (one per seed, starting at --seed)."),
    seed: int = typer.Option(0),
    steps: int = typer.Option(25),
    guidance: float = typer.Option(5.0),
    model: str = typer.Option("embedded:tiny-world"),
    threads: int = typer.Option(1, help="torch threads (1 is fastest on a busy 2-core box)."),
) -> None:
    """Generate a few images for a prompt, for a quick look."""
    from fmn.eval.grids import labelled_grid
    from fmn.model.images import generate

    _threads(threads)
    pipe = _load_model_or_exit(model)
    images = generate(
        pipe, [prompt] * n, list(range(seed, seed + n)), steps=steps, guidance=guidance
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid({prompt[:18]: images}, scale=4).save(out)
    console.print(f"wrote {out}")


@world_app.command("build")
def world_build(
    out: Path = typer.Option(Path("build/world"), help="Build folder (fp32, resumable)."),
    world: str = _world_option(),
    ship: bool = typer.Option(False, help="Also install it, in fp16, as embedded:<world>."),
    grids: Path = typer.Option(
        Path("docs/worlds"), help="With --ship: where its grid image goes (not in the package)."
    ),
    until: str = typer.Option(
        "measure", help="Stop after this stage: vae | unet | classifier | measure."
    ),
    quick: bool = typer.Option(False, help="A few steps per stage: checks the plumbing only."),
    threads: int = typer.Option(2, help="torch threads for training."),
    minutes: float = typer.Option(
        None, help="Stop at the first UNet checkpoint after this many minutes; run again to go on."
    ),
) -> None:
    """Train an embedded world from scratch, stage by stage; a re-run resumes (tiny-world
    about 1 hour on 2 CPU cores, crowd-world about 2: docs/world.md)."""
    from fmn.model.load import embedded_path
    from fmn.world.train import STAGES, BuildPaused, build_world, world_config

    w = _get_world_or_exit(world)
    if until not in (*STAGES, "measure"):
        console.print(f"[red]--until: one of {', '.join((*STAGES, 'measure'))}[/red]")
        raise typer.Exit(2)
    _threads(threads)
    cfg = world_config(w.name, quick=quick)
    t0 = time.time()
    with _bar() as update:
        try:
            build_world(
                out, cfg, update, until=None if until == "measure" else until, minutes=minutes
            )
        except ValueError as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from None
        except BuildPaused as e:
            console.print(f"{out}: {e}")
            return
        if until != "measure":
            console.print(f"stopped after {until}: {out} (run again to go on)")
            return
        report = _measure_world(out, update, w, quick)
    report["build_seconds"] = round(time.time() - t0, 1)
    from fmn.world.evaluate import ship as ship_world

    write_json(out / "world_report.json", report)
    _print_world_report(report)
    if ship:
        dest = embedded_path(w.name)
        ship_world(out, dest)
        grids.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "grid.png", grids / f"{w.name}-grid.png")
        console.print(f"installed as embedded:{w.name} at {dest}; grid: {grids}/{w.name}-grid.png")


def _measure_world(path: Path, update, world, quick: bool = False) -> dict:
    """Classifier accuracy and base M-Score of a built world; writes grid.png beside it.
    quick: a handful of images, 2 steps (plumbing only)."""
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.model.load import load_pipeline
    from fmn.world.evaluate import (
        REPORT_SEEDS,
        base_mscore,
        classifier_accuracy,
        phrasing_mscore,
        role_shares,
    )

    pipe = load_pipeline(str(path))
    detector = WorldDetector(path / "classifier")
    acc = classifier_accuracy(detector, pipe.vae, n=64 if quick else 2000, world=world)
    size = {"prompts": 1, "seeds": REPORT_SEEDS[:1], "steps": 2} if quick else {}
    summary, images = base_mscore(
        pipe, detector, lambda d, t: update("base M-Score", d, t), world=world, **size
    )
    write_with(path / "grid.png", lambda p: _concept_grid(images).save(p, format="PNG"))
    seeds = list(size.get("seeds", REPORT_SEEDS))
    report = {"world": world.name, "seeds": seeds, "classifier_accuracy": acc}
    report["base_mscore"] = summary
    if any(c.words for c in world.concepts()):
        small = {"prompts": 1, "seeds": REPORT_SEEDS[:1]} if quick else {}
        report["phrasings"] = phrasing_mscore(pipe, detector, world, **small)
    if world.role is not None:
        report["role"] = role_shares(pipe, detector, world, n=4 if quick else 64)
    return report


def _concept_grid(images: dict):
    from fmn.eval.grids import labelled_grid

    return labelled_grid({cid: imgs for cid, imgs in images.items()}, scale=3, per_row=8)


def _print_world_report(report: dict) -> None:
    acc = report["classifier_accuracy"]
    table = Table("images", *acc["clean"].keys(), title="World classifier accuracy (held-out)")
    for name, row in acc.items():
        table.add_row(name, *(f"{v:.3f}" for v in row.values()))
    console.print(table)
    _print_mscore(report["base_mscore"])


def _print_mscore(summary: dict) -> None:
    table = Table(
        "concept", "type", "M-Score", "Acc", "chance", title="Base model M-Score (world detector)"
    )
    for cid, s in summary.items():
        table.add_row(cid, s["type"], f"{s['mscore']:.3f}", f"{s['acc']:.3f}", f"{s['chance']:.3f}")
    console.print(table)


# Defaults of forget/merge/apply: read from the manifest's models (fmn.manifest), where
# every stage option's default lives, so that these commands make what `fmn run` makes.
BASE_MODEL: str = option_default(Manifest, "base_model")


def _default(model: type, name: str) -> str:
    """An option's default as help shows it (show_default): the manifest model's."""
    return str(option_default(model, name))


def _by_type(name: str) -> str:
    """'by type: id X, object Y, ...' as help shows it, from fmn.manifest.type_defaults."""
    per_type = ", ".join(f"{t} {type_defaults(t)[name]}" for t in get_args(ConceptType))
    return f"by type: {per_type}"


def _choices(literal: object) -> str:
    return " | ".join(get_args(literal))


@app.command()
def forget(
    concept_id: str = typer.Option(..., "--id", help="Concept id (slug), e.g. circle."),
    concept_type: str = typer.Option(..., "--type", help=_choices(ConceptType)),
    out: Path = typer.Option(..., help="Folder for delta.safetensors and resteer.json."),
    model: str = typer.Option(BASE_MODEL, help="Base model (see README)."),
    text: str = typer.Option(None, help="Concept text; default: id with '-' as space."),
    word: list[str] = typer.Option(
        [],
        help="A word or phrase that reaches the concept (repeatable: --word night --word "
        "midnight); prompts and images cycle over them, the first is its text unless --text.",
    ),
    correct_to: list[str] = typer.Option(
        [],
        help="Correct the concept instead of forgetting it: a prompt it should draw like "
        "(repeatable: the guide draws them in turn), or one folder of guide images.",
    ),
    images: Path = typer.Option(None, help="Folder of the concept's images."),
    # None: not given, so the manifest's default applies (resolved as a manifest concept);
    # help shows that default, read from the manifest's models
    generate: int = typer.Option(
        None, help="Images to generate when no --images.", show_default=str(GENERATED_IMAGES)
    ),
    steps: int = typer.Option(
        None, help="Re-steering steps.", show_default=_default(ResteerOptions, "steps")
    ),
    lr: float = typer.Option(
        None, help="Learning rate.", show_default=_default(ResteerOptions, "lr")
    ),
    params: str = typer.Option(
        None, help=_choices(ResteerParams), show_default=_default(ResteerOptions, "params")
    ),
    positions: str = typer.Option(
        None, help=_choices(Positions), show_default=_by_type("positions")
    ),
    preserve_weight: float = typer.Option(
        None, help="Anchor preservation weight.", show_default=_by_type("preserve_weight")
    ),
    preserve: list[str] = typer.Option([], help="id:type of a concept to keep (repeatable)."),
    mask: str = typer.Option(
        None,
        help=f"{_choices(MaskName)} | a mask folder; limits re-steering's and --invert's "
        "losses to the concept's pixels (with --invert, attention masks kept the other "
        "concepts better on the world: docs/masks.md)",
        show_default=_default(ResteerOptions, "mask"),
    ),
    invert: bool = typer.Option(
        option_default(InvertOptions, "enabled"),
        help="Textual inversion first; re-steer its tokens.",
    ),
    ti_steps: int = typer.Option(
        None, help="Textual inversion steps.", show_default=_default(InvertOptions, "steps")
    ),
    ti_tokens: int = typer.Option(
        None, help="Learned tokens.", show_default=_default(InvertOptions, "tokens")
    ),
    seed: int = typer.Option(
        None, help="Random seed.", show_default=_default(ResteerOptions, "seed")
    ),
    loop: bool = typer.Option(
        None,
        "--loop/--no-loop",
        help="Closed loop: judge each rung, re-steer harder while the concept is drawn, "
        "fail by name when a watched concept moves (docs/resteer.md).",
        show_default=_default(ResteerOptions, "loop"),
    ),
    erase: str = typer.Option(
        "auto",
        help="gate | resteer | auto: how the concept is forgotten, as a manifest's `erase` "
        "(auto gates identities, objects and styles that learn no tokens: docs/mass.md).",
    ),
    robust: bool = typer.Option(
        option_default(Merge, "robust"),
        "--robust/--no-robust",
        help="Robust mode for a gate: read every token as a word of the base vocabulary, so "
        "a textual inversion cannot go around it (a manifest's merge.robust).",
    ),
    threads: int = typer.Option(1),
) -> None:
    """Forget one concept and write its patch: a gate (eraser.safetensors) or a
    re-steering patch (delta.safetensors), with how far it went in gate.json or
    resteer.json. The options are resolved like a manifest concept's: the patch is the one
    `fmn run` makes of the same concept, and `fmn audit --patch` and `fmn apply` take
    either."""
    from fmn.manifest import Concept, Defaults, resolve_concept
    from fmn.model.patch import save_patch
    from fmn.train.correct import correct_resolved
    from fmn.train.forget import forget_resolved
    from fmn.train.invert import save_ti
    from fmn.train.loop import NotForgotten

    given = {
        "steps": steps,
        "lr": lr,
        "params": params,
        "positions": positions,
        "preserve_weight": preserve_weight,
        "seed": seed,
        "loop": loop,
    }
    # every option is checked before the model loads, with the manifest's rules and hints
    concept = {"id": concept_id, "type": concept_type, "text": text, "words": word or None}
    concept["erase"] = erase
    if correct_to:
        folders = [c for c in correct_to if Path(c).is_dir()]
        if folders and len(correct_to) > 1:
            _exit_on_problems(["--correct-to: one folder of guide images, or prompts, not both"])
        if invert:
            _exit_on_problems(["--invert: a correction trains the concept's own words (drop it)"])
        guide = {"images": folders[0]} if folders else {"prompts": correct_to}
        concept |= {"action": "correct", "guide": guide}
    _exit_on_problems(_forget_problems(concept, given, generate, images, mask, ti_steps, ti_tokens))
    spec = {**concept, "resteer": given}
    spec["invert"] = {"enabled": invert, "steps": ti_steps, "tokens": ti_tokens}
    if images is not None or generate is not None:
        spec["images"] = images if images is not None else {"generate": generate}
    if mask is not None:
        spec["mask"] = mask if mask in get_args(MaskName) else {"folder": mask}
    resolved = resolve_concept(Concept.model_validate(spec), Defaults(), Path.cwd())
    kept = [_id_type(p, "--preserve") for p in preserve]
    if robust and resolved.erase != "gate":
        _exit_on_problems([
            f"--robust: it locks the vocabulary for a gate, and {concept_id} is re-steered "
            "(hint: --erase gate, or drop --robust)"
        ])  # fmt: skip
    if resolved.erase == "gate":
        unused = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        unused += [o for o, v in (("--mask", mask), ("--images", images)) if v is not None]
        unused += ["--generate"] if generate is not None else []
        unused += [o for o, v in (("--ti-steps", ti_steps), ("--ti-tokens", ti_tokens)) if v]
        unused += ["--invert"] if invert else []
        if unused:
            _exit_on_problems([
                f"{o}: {concept_id} is gated, so it is not re-steered and draws no images "
                "(hint: --erase resteer, or drop it)"
                for o in unused
            ])  # fmt: skip
    _threads(threads)
    pipe = _load_model_or_exit(model)
    if resolved.erase == "gate":
        _forget_gated(pipe, resolved, kept, out, lock=robust)
        return
    with _bar() as update:
        try:
            if resolved.action == "correct":
                res = correct_resolved(pipe, resolved, preserve=kept, progress=update)
            else:
                res = forget_resolved(pipe, resolved, preserve=kept, progress=update)
        except NotForgotten as e:  # nothing shipped: the log says how far the loop went
            write_json(out / "resteer.json", {"concept": concept_id, **e.result.log()})
            console.print(f"[red]{e}[/red]\n  log: {out / 'resteer.json'}")
            raise typer.Exit(1) from None
    path = save_patch(res.patch, out)
    if res.ti is not None:
        save_ti(res.ti, out / "ti.safetensors")
    r = res.resteer
    write_json(out / "resteer.json", {"concept": concept_id, **res.log()})
    how = f"{res.loop['reason']}; " if res.loop else ""
    if resolved.action == "correct":
        console.print(
            f"{concept_id}: corrected towards its guide in {len(r.losses)} steps "
            f"({r.seconds:.1f} s, loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}); patch: {path}"
        )
        if not kept:
            console.print(
                "[yellow]hint: nothing was listed as preserved, and a trained correction moves "
                "the words the model confuses with this one; list them with --preserve "
                "id:type (docs/correct.md)[/yellow]"
            )
        return
    console.print(
        f"{concept_id}: {how}attention on its tokens {r.attention_before:.4f} -> "
        f"{r.attention_after:.4f} in {r.seconds:.1f} s; patch: {path}"
    )


def _forget_gated(pipe, resolved, kept: list[tuple[str, str]], out: Path, lock: bool) -> None:
    """`fmn forget` of a gated concept (a correction's: its route): its gate, written to
    <out>/eraser.safetensors, and how far it reaches in <out>/gate.json; refused by name
    when a kept concept's prompts read the same as its own. lock: robust mode."""
    from fmn.merge.gates import fit, gated_inputs
    from fmn.merge.similar import widened
    from fmn.model import eraser

    t = time.time()
    concepts, guides = gated_inputs([resolved])
    with _bar() as update:
        try:
            found = fit(pipe, concepts, widen=widened(concepts), guides=guides, preserve=kept,
                        lock=lock, progress=update)  # fmt: skip
        except eraser.EraserError as e:
            console.print(f"[red]{resolved.id}: {e}[/red]")
            raise typer.Exit(1) from None
    path = eraser.save(found, out / eraser.ERASER_FILE)
    (gate,) = found.gates
    log = {"concept": resolved.id, "erase": "gate", "robust": lock, "reason": gate.reason(),
           "radius": gate.radius, "nearest": gate.nearest, "near": gate.near,
           "seconds": round(time.time() - t, 2)}  # fmt: skip
    write_json(out / "gate.json", log)
    console.print(f"{resolved.id}: {gate.reason()}; patch: {path}")


def _forget_problems(concept, resteer, generate, images, mask, ti_steps, ti_tokens) -> list[str]:
    """`fmn forget`'s options checked like the same fields of a manifest: '--opt: problem'."""
    from typing import get_args

    from fmn.manifest import (
        Concept,
        Generate,
        ImageFolderError,
        InvertOverride,
        MaskName,
        ResteerOverride,
        check_image_folder,
        option_problems,
    )

    ti = {"steps": ti_steps, "tokens": ti_tokens}
    checks = [
        (
            Concept,
            concept,
            {"words": "word", "guide.images": "correct-to", "guide.prompts": "correct-to"},
        ),
        (ResteerOverride, resteer, {}),
        (InvertOverride, ti, {"steps": "ti-steps", "tokens": "ti-tokens"}),
    ]
    if generate is not None:  # None: the manifest's default
        checks.append((Generate, {"generate": generate}, {}))
    lines = [
        f"--{names.get(p.loc, p.loc.replace('_', '-'))}: {p.msg}"
        + (f" (hint: {p.hint})" if p.hint else "")
        for model, values, names in checks
        for p in option_problems(model, values)
    ]
    folders = [("--images", images)] if images is not None else []
    if mask is not None and mask not in get_args(MaskName):
        if Path(mask).is_dir():
            folders.append(("--mask", Path(mask)))
        else:
            allowed = ", ".join(get_args(MaskName))
            lines.append(f"--mask: unknown mask {mask!r} (hint: {allowed} or a mask folder)")
    for option, folder in folders:
        try:
            check_image_folder(folder, deep=True)
        except ImageFolderError as e:
            lines.append(f"{option}: {e}")
    return lines


def _exit_on_problems(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line, err=True)
    if lines:
        raise typer.Exit(2)


def _load_model_or_exit(spec: str, where: str = "--model"):
    """load_pipeline, or exit 2 with the reason (missing path, pickle, unsupported model)."""
    from fmn.model.load import ModelLoadError, load_pipeline

    try:
        return load_pipeline(spec)
    except ModelLoadError as e:
        typer.echo(f"{where}: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def apply(
    patch: Path = typer.Option(..., help="delta.safetensors or its folder."),
    out: Path = typer.Option(..., help="Folder for the patched diffusers pipeline."),
    model: str = typer.Option(BASE_MODEL, help="Base model (see README)."),
    scale: float = typer.Option(1.0),
    force: bool = typer.Option(False, help="Apply even to another base model."),
) -> None:
    """Apply a patch to a model and save the result as a diffusers pipeline folder."""

    from fmn.model.patch import PatchError, apply_patch, load_patch

    try:
        the_patch = load_patch(patch)  # read and checked before the model loads
    except PatchError as e:
        typer.echo(f"{patch}: {e}", err=True)
        raise typer.Exit(2) from None
    pipe = _load_model_or_exit(model)
    try:
        apply_patch(pipe, the_patch, scale, check_base=not force)
    except PatchError as e:
        typer.echo(f"{patch}: {e}", err=True)
        raise typer.Exit(2) from None
    with atomic_dir(out) as tmp:  # the old folder stays until the new one is whole
        pipe.save_pretrained(tmp)
        if the_patch.eraser is not None:  # fmn.model.load installs it with the model
            from fmn.model import eraser

            eraser.save(the_patch.eraser, tmp / eraser.ERASER_FILE)
    console.print(f"wrote {out}")


@app.command()
def export(
    patch: Path = typer.Option(..., help="delta.safetensors or its folder."),
    out: Path = typer.Option(..., help="File to write (.safetensors)."),
    fmt: str = typer.Option(
        "lora", "--format", help="lora (diffusers/peft) | kohya (A1111, ComfyUI)"
    ),
    rank: int = typer.Option(None, min=1, help="SVD rank; default: full rank (exact)."),
) -> None:
    """Export a patch as a LoRA file that diffusers, ComfyUI or AUTOMATIC1111 loads."""
    from fmn.model.patch import PatchError, export_kohya, export_lora, load_patch

    exporters = {"lora": export_lora, "kohya": export_kohya}
    if fmt not in exporters:
        raise typer.BadParameter(f"use one of {list(exporters)}", param_hint="--format")
    try:
        report = exporters[fmt](load_patch(patch), out, rank)
    except PatchError as e:
        typer.echo(f"{patch}: {e}", err=True)
        raise typer.Exit(2) from None
    err = report["relative_error"]
    console.print(f"wrote {report['path']}: rank {report['rank']}, relative error {err:.2e}")


@app.command()
def merge(
    patches: list[Path] = typer.Argument(
        ..., help="Patch files/folders, or a folder of concept folders (one patch each)."
    ),
    out: Path = typer.Option(..., help="Folder: delta.safetensors, lora.safetensors, model/."),
    model: str = typer.Option(
        None, help="Base model.", show_default=f"the manifest's, else {BASE_MODEL}"
    ),
    manifest: Path = typer.Option(None, help="Take preserve list, method and weights from it."),
    method: str = typer.Option(
        None,
        help="closed-form | sum",
        show_default=f"the manifest's, else {_default(Merge, 'method')}",
    ),
    preserve: list[str] = typer.Option([], help="id:type of a concept to keep (repeatable)."),
    weight: list[str] = typer.Option([], help="id=w weight of a concept's patch (repeatable)."),
    erase_weight: float = typer.Option(
        None, min=0.0, help="closed-form: pull each concept to its anchor (docs/merge.md)."
    ),
    anchor: list[str] = typer.Option([], help="id=text anchor of a concept (repeatable)."),
    choose_anchors: bool = typer.Option(
        None, help="closed-form erase: pick anchors the base model does not draw as targets."
    ),
    overshoot: float = typer.Option(
        None, min=0.0, help="closed-form erase: push concepts past their anchors (ESD: 1)."
    ),
    tune: bool = typer.Option(
        None, help="closed-form: pick weights by the base model's own judgement (slow)."
    ),
    lora_rank: int = typer.Option(None, help="Rank of lora.safetensors; default: full (exact)."),
    threads: int = typer.Option(1),
) -> None:
    """Merge per-concept patches into one model (closed-form least squares or a sum)."""
    from fmn.merge.fuse import MergeConfig, MergeError, concept_patches, merge_patches, write_merged
    from fmn.model.patch import PatchError, patch_concept

    cfg, kept, base = MergeConfig(), [], model or BASE_MODEL
    if manifest is not None:
        m = _load_manifest_or_exit(manifest)
        cfg = MergeConfig.from_manifest(m.merge)
        kept = [(p.text, p.type) for p in m.preserve]
        base = model or m.base_model
    kept += [_id_type(p, "--preserve") for p in preserve]
    for item in weight:
        cid, _, w = item.partition("=")
        try:
            cfg.weights[cid] = float(w)
        except ValueError:
            raise typer.BadParameter(
                f"use id=weight, got {item!r}", param_hint="--weight"
            ) from None
    for item in anchor:
        cid, _, text = item.partition("=")
        if not cid or not text.strip():
            raise typer.BadParameter(f"use id=text, got {item!r}", param_hint="--anchor") from None
        cfg.anchors[cid] = text.strip()
    given = {
        "method": method,
        "erase_weight": erase_weight,
        "choose_anchors": choose_anchors,
        "overshoot": overshoot,
        "tune": tune,
    }
    # options left out keep the manifest's value, or the default (fmn.manifest.Merge)
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if cfg.method == "joint":
        typer.echo("joint trains all concepts in one run: use `fmn run`, not merge", err=True)
        raise typer.Exit(2)
    gates = [str(g) for g in _gate_folders(patches)]
    if gates:  # the gates of many concepts are fitted together, on one vocabulary
        typer.echo(
            f"merge: {', '.join(gates)}: a gate (eraser.safetensors), not a re-steering patch "
            "(hint: list the concepts in a manifest and `fmn run` it, which fits their gates "
            "together, or forget them with `fmn forget --erase resteer`)",
            err=True,
        )
        raise typer.Exit(2)
    try:
        files = [f for p in patches for f in (concept_patches(p) if _is_patch_dir(p) else [p])]
        merged = [patch_concept(f) for f in files]  # metadata only: checked before any work
    except PatchError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    unknown = [cid for cid in [*cfg.weights, *cfg.anchors] if cid not in merged]
    if unknown:  # a typo would otherwise merge at weight 1 without a word
        where = "--weight/--anchor" if weight or anchor else "merge.weights/anchors"
        typer.echo(
            f"{where}: no patch of concept {', '.join(map(repr, unknown))} "
            f"(hint: the patches are of: {', '.join(merged)})",
            err=True,
        )
        raise typer.Exit(2)
    _threads(threads)
    pipe = _load_model_or_exit(base, "--model" if model or manifest is None else "base_model")
    try:
        with _bar() as update:
            res = merge_patches(pipe, files, cfg, preserve=kept, progress=update)
    except (MergeError, PatchError) as e:
        typer.echo(f"merge: {e}", err=True)
        raise typer.Exit(2) from None
    record = write_merged(pipe, res, out, lora_rank=lora_rank)
    for cid, k in record["kept"].items():
        console.print(f"  {cid}: {k:.1%} of its edit kept")
    for t in (t for t in record["tuning"] if t["chosen"]):
        console.print(
            f"  tuned: preserve {t['preserve_weight']:g}, erase {t['erase_weight']:g}, "
            f"overshoot {t['overshoot']:g} (judged by the base model: targets drawn "
            f"{t['self_acc_e']:.0%}, preserved kept {t['self_acc_s_ratio']:.0%})"
        )
    for c in (c for c in record["anchor_checks"] if c["chosen"]):
        console.print(
            f"  anchor for {c['type']}: {c['anchor']!r} ({c['share']:.0%} of its images read "
            "as a target by the base model)"
        )
    console.print(
        f"merged {len(record['concepts'])} patches ({cfg.method}) in {res.seconds:.2f} s: "
        f"{out}/ (delta.safetensors, lora.safetensors, model/, merge.json)"
    )


def _gate_folders(paths: list[Path]) -> list[Path]:
    """The folders among `paths` (or their concept folders) that hold a gate alone."""
    from fmn.model.eraser import ERASER_FILE

    folders = [q for p in paths if p.is_dir() for q in (p, *sorted(p.iterdir())) if q.is_dir()]
    return [q for q in folders if (q / ERASER_FILE).is_file() and not _has_delta(q)]


def _has_delta(folder: Path) -> bool:
    return (folder / "delta.safetensors").exists()


def _is_patch_dir(path: Path) -> bool:
    """A folder of concept folders (not itself a patch folder)."""
    return path.is_dir() and not _has_delta(path)


def _id_type(value: str, option: str) -> tuple[str, str]:
    from typing import get_args

    from fmn.manifest import ConceptType

    cid, _, kind = value.partition(":")
    if not cid or not kind:
        raise typer.BadParameter("use id:type, e.g. circle:object", param_hint=option)
    if kind not in get_args(ConceptType):
        types = " | ".join(get_args(ConceptType))
        raise typer.BadParameter(
            f"unknown type {kind!r} in {value!r}; use {types}", param_hint=option
        )
    return cid.replace("-", " "), kind


def _load_manifest_or_exit(path: Path):
    from fmn.manifest import ManifestError, load_manifest

    try:
        return load_manifest(path)
    except ManifestError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    manifest: Path = typer.Argument(..., help="Manifest YAML file."),
    runner: str = typer.Option("default", help="default | dask | dask-cuda (see README)."),
    workers: int = typer.Option(2, help="Dask workers (default runner: threads)."),
    address: str = typer.Option(None, help="An existing Dask scheduler, e.g. tcp://host:8786."),
    out: Path = typer.Option(None, help="Run folder (default: build/<name>)."),
    report: Path = typer.Option(
        None, help="Report folder (default: reports/<name>; with --out: <out>/report)."
    ),
    threads: int = typer.Option(1, help="torch threads per process."),
    fail_on_gates: bool = typer.Option(
        True, help="Exit 1 when a gate fails (--no-fail-on-gates: the summary records it)."
    ),
) -> None:
    """Build a manifest with Prefect: forget every concept, merge, audit, report. A re-run
    redoes only what changed. Exit 1 if a gate fails, 2 on bad input or a busy run folder."""
    from fmn.cli_run import run_manifest

    code = run_manifest(
        manifest,
        runner=runner,
        workers=workers,
        address=address,
        out=out,
        report=report,
        threads=threads,
        fail_on_gates=fail_on_gates,
        console=console,
    )
    raise typer.Exit(code)


@app.command()
def demo(
    out: Path = typer.Option(Path("reports/world"), help="Where the grid and scores go."),
    threads: int = typer.Option(1, help="torch threads."),
) -> None:
    """Load the embedded model, render every concept and print its world M-Score."""
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.model.load import load_pipeline
    from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
    from fmn.world.evaluate import base_mscore

    _threads(threads)
    pipe = load_pipeline(EMBEDDED_NAME)
    detector = WorldDetector(EMBEDDED_DIR / "classifier")
    with _bar() as update:
        summary, images = base_mscore(pipe, detector, lambda d, t: update("generating", d, t))
    write_with(out / "grid.png", lambda p: _concept_grid(images).save(p, format="PNG"))
    write_json(out / "mscore.json", summary)
    _print_mscore(summary)
    console.print(f"\nReport: {out}/ (grid.png: every concept, 8 samples each; mscore.json)")


if __name__ == "__main__":
    app()
