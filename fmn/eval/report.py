"""An audit's report folder: what people read (index.html with image grids and bar
charts, readable offline) and what tools read (parquet, JSON metrics, CSV plots for DVC).

    mscore.parquet  one row per concept x model x prompt x seed (fmn.eval.audit.MODELS)
    summary.json    per concept and per role M-Score/Acc/ratio, gates, models, timings
    metrics.json    the headline numbers, flat (dvc metrics: a column each, not hundreds)
    mscore.csv      one row per concept (dvc plots)
    index.html      gates, tables, charts (mscore.png, ratio.png), grids (img/*.png)

The folder is written whole into a temp folder beside it and renamed into place, so a
crash leaves the previous report (or none), never half of one.
"""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fmn.eval.result import ATTACKS, attack_lines
from fmn.io import atomic_dir, write_json, write_text, write_with

if TYPE_CHECKING:
    from fmn.eval.result import AuditResult

SCHEMA = pa.schema(
    [
        ("concept", pa.string()),
        ("model", pa.string()),
        ("role", pa.string()),
        ("type", pa.string()),
        ("detector", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("probability", pa.float64()),
        ("recognised", pa.bool_()),
        ("parts", pa.string()),  # nudenet's counted body parts per image, else empty
    ]
)
CSV_FIELDS = [
    "concept",
    "role",
    "type",
    "detector",
    "mscore_base",
    "mscore",
    "ratio",
    "acc_base",
    "acc",
    "recovery_mscore",
    "recovery_ratio",
    "phrasing_mscore",
    "phrasing_ratio",
    "prompt_mscore",
    "prompt_ratio",
]
TILE = 96  # grid tile side in px: 32 px world images upscale crisply, 512 px ones shrink
GAP = 2  # px between tiles
MODEL_TITLES = {
    "base": "baseline",
    "patched": "audited model",
    "recovered": "recovery attack",
    "phrasing": "phrasing attack",
    "prompt": "prompt attack",
}
# the image grids' column headers: which side is the baseline must be readable at a glance
GRID_TITLES = {
    "base": "baseline (before)",
    "patched": "audited model (after)",
    "recovered": "recovery attack",
    "phrasing": "phrasing attack (best)",
    "prompt": "prompt attack",
}
_PARTS = (("baseline", "parts_base"), ("audited model", "parts"))  # rows of the parts table
PROMPT_CHARS = 60  # longer prompts are shortened in the grids; the full text is the tooltip


def write_report(out: Path, result: AuditResult) -> Path:
    """Write the report folder `out` (replacing any previous one whole); returns it."""
    with atomic_dir(out) as tmp:
        tmp.chmod(0o777 & ~_umask())  # a temp folder is private (0700); a report is not
        write_parquet(tmp / "mscore.parquet", result.rows)
        write_json(tmp / "summary.json", result.summary)
        write_json(tmp / "metrics.json", compact_metrics(result.summary))
        write_text(tmp / "mscore.csv", mscore_csv(result.summary))
        charts = write_charts(tmp, result.summary)
        grids = write_grids(tmp / "img", result)
        write_text(tmp / "index.html", render_html(result, charts, grids))
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_parquet(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    write_with(path, lambda p: pq.write_table(table, p))


def compact_metrics(summary: dict) -> dict:
    """The few numbers a build is judged by, flat: `dvc metrics show` prints a column per
    key, and summary.json's per-concept keys made that hundreds wide. Per-concept detail
    stays in summary.json and mscore.csv (dvc plots)."""
    concepts = summary["concepts"]
    targets = {c: v["mscore"] for c, v in concepts.items() if v["role"] == "target"}
    # a ratio is None where the baseline never drew the concept: nothing to damage
    kept = {c: v["ratio"] for c, v in concepts.items() if v["role"] == "preserve"}
    kept = {c: r for c, r in kept.items() if r is not None}
    worst_target = max(targets, key=targets.__getitem__) if targets else None
    worst_kept = min(kept, key=kept.__getitem__) if kept else None
    gates = summary["gates"]
    out = {
        "target_mscore": summary["targets"]["mscore"],
        "preserve_ratio": summary["preserve"]["ratio"],
        "worst_target": worst_target,
        "worst_target_mscore": targets.get(worst_target),
        "worst_preserve": worst_kept,
        "worst_preserve_ratio": kept.get(worst_kept),
        "gates_passed": gates["passed"],
        "gate_failures": len(gates["failures"]),
    }
    for attack in ATTACKS:  # where that attack ran
        if f"{attack}_asr" in summary["targets"]:
            out[f"{attack}_asr"] = summary["targets"][f"{attack}_asr"]
    if "failed" in summary:  # a build (fmn run), not a bare audit: say what it trained
        out["targets_failed"] = len(summary["failed"])
        out["targets_trained"] = len(targets) - out["targets_failed"]
    return out


def mscore_csv(summary: dict) -> str:
    """One row per concept, for `dvc plots` (x: concept, y: mscore / ratio)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for cid, s in summary["concepts"].items():
        writer.writerow({"concept": cid, **{k: _csv(s.get(k)) for k in CSV_FIELDS[1:]}})
    return buf.getvalue()


def _csv(v) -> str:
    return "" if v is None else f"{v:.6f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------
# Pictures


def _png(path: Path, fig) -> str:
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight"))
    return path.name


def write_charts(folder: Path, summary: dict) -> list[tuple[str, str]]:
    """Bar charts (matplotlib, no display needed): M-Score before/after per concept, and
    the ratio per concept with the gates drawn in. Returns (file, alt text) pairs."""
    from matplotlib.figure import Figure  # the Figure API draws with Agg, no global state

    concepts = summary["concepts"]
    ids = list(concepts)
    x = np.arange(len(ids))
    gates = summary["gates"]
    width = max(6.0, 0.45 * len(ids))

    fig = Figure(figsize=(width, 3.6))
    ax = fig.subplots()
    # a correction measured only by its guide concepts has no M-Score of its own
    base = [_or_nan(concepts[c]["mscore_base"]) for c in ids]
    after = [_or_nan(concepts[c]["mscore"]) for c in ids]
    ax.bar(x - 0.2, base, 0.4, label="baseline", color="#9aa5b1")
    ax.bar(x + 0.2, after, 0.4, label="audited", color="#d9534f")
    recovery = [concepts[c].get("recovery_mscore") for c in ids]
    if any(v is not None for v in recovery):
        ax.scatter(x + 0.2, [np.nan if v is None else v for v in recovery], marker="^",
                   color="black", label="recovery attack", zorder=3)  # fmt: skip
    ax.axhline(gates["target_mscore_max"], color="#d9534f", ls="--", lw=1, label="target gate")
    _decorate(ax, x, ids, concepts, "M-Score")
    charts = [(_png(folder / "mscore.png", fig), "M-Score per concept, baseline vs audited")]

    fig = Figure(figsize=(width, 3.6))
    ax = fig.subplots()
    ratio = [np.nan if concepts[c]["ratio"] is None else concepts[c]["ratio"] for c in ids]
    colours = ["#d9534f" if concepts[c]["role"] == "target" else "#5cb85c" for c in ids]
    ax.bar(x, ratio, 0.6, color=colours)
    ax.axhline(1.0, color="grey", lw=1)
    ax.axhline(gates["preserve_ratio_min"], color="#5cb85c", ls="--", lw=1, label="preserve gate")
    _decorate(ax, x, ids, concepts, "ratio audited / baseline")
    charts.append((_png(folder / "ratio.png", fig), "M-Score ratio per concept"))
    return charts


def _or_nan(v: float | None) -> float:
    return np.nan if v is None else v


def _decorate(ax, x, ids, concepts, ylabel: str) -> None:
    ax.set_xticks(x, [f"{c}\n({concepts[c]['role']})" for c in ids], rotation=60, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars stay visible


def _tiles(images: np.ndarray) -> np.ndarray:
    """Images resized to TILE x TILE: nearest-neighbour up (crisp), box filter down."""
    if images.shape[1] == TILE:
        return images
    up = images.shape[1] < TILE
    resample = Image.Resampling.NEAREST if up else Image.Resampling.BOX
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((TILE, TILE), resample)) for im in images]
    )


def _grid(tiles: np.ndarray, per_row: int) -> Image.Image:
    """Tiles in rows of `per_row` (a row per prompt, a column per seed), GAP px apart, no
    labels: the HTML labels each row with its prompt, cropping the row out of this image."""
    rows = len(tiles) // per_row
    size = (per_row * (TILE + GAP) - GAP, rows * (TILE + GAP) - GAP)
    canvas = Image.new("RGB", size, "white")
    for k, tile in enumerate(tiles[: rows * per_row]):
        canvas.paste(
            Image.fromarray(tile), ((k % per_row) * (TILE + GAP), (k // per_row) * (TILE + GAP))
        )
    return canvas


def write_grids(folder: Path, result: AuditResult) -> dict[str, dict[str, str]]:
    """One PNG per concept and model: a row per prompt, a column per seed. Returns
    concept id -> model -> path relative to the report folder."""
    seeds = len(result.summary["evaluate"]["seeds"])
    out: dict[str, dict[str, str]] = {}
    for model, per_concept in result.images.items():
        for cid, images in per_concept.items():
            grid = _grid(_tiles(images), seeds)
            write_with(folder / f"{cid}-{model}.png", lambda p, g=grid: g.save(p, format="PNG"))
            out.setdefault(cid, {})[model] = f"img/{cid}-{model}.png"
    return out


# ---------------------------------------------------------------------------------------
# HTML


def _prompt_count(n: int | dict[str, int]) -> str:
    """summary.json's prompts_per_concept: a number, or one per type (a prompt file with
    sections of different lengths)."""
    return str(n) if isinstance(n, int) else ", ".join(f"{v} ({k})" for k, v in n.items())


def _num(v) -> str:
    return "&ndash;" if v is None else f"{v:.3f}"


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.pass { color: #2e7d32; font-weight: bold; } .fail { color: #c62828; font-weight: bold; }
.scroll { overflow-x: auto; }
table.grid td { padding: 2px; } table.grid th { text-align: center; }
table.grid th.prompt { text-align: left; font-weight: normal; max-width: 22em; }
img.strip { object-fit: none; display: block; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
code { font-size: 12px; }
"""


def render_html(result: AuditResult, charts: list[tuple[str, str]], grids: dict) -> str:
    """index.html: self-contained apart from its PNGs beside it (relative links, no CDN)."""
    s = result.summary
    e = html.escape
    gates = s["gates"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>M-Score audit: {e(s['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>M-Score audit: {e(s['name'])}</h1>",
    ]
    verdict = "passed" if gates["passed"] else f"failed ({len(gates['failures'])})"
    recovery_gate = gates.get("recovery_max")
    parts.append(
        f'<p class="{"pass" if gates["passed"] else "fail"}">Gates {verdict}: target M-Score '
        f"&le; {gates['target_mscore_max']}, preserved ratio &ge; {gates['preserve_ratio_min']}"
        + ("" if recovery_gate is None else f", recovered ratio &le; {recovery_gate}")
        + "".join(
            f", {e(ATTACKS[a])} ratio &le; {v}" for a, v in (gates.get("attack_max") or {}).items()
        )
        + "</p>"
    )
    parts += [f"<p>{e(line)}.</p>" for line in attack_lines(s)]
    if gates["failures"]:
        parts.append("<ul>" + "".join(f"<li>{e(f['message'])}</li>" for f in gates["failures"]))
        parts.append("</ul>")
    parts.append("<table><tr><th>model</th><th>spec</th><th>fingerprint</th></tr>")
    for key, m in s["models"].items():
        parts.append(
            f"<tr><td>{MODEL_TITLES[key]}</td><td><code>{e(m['spec'])}</code></td>"
            f"<td><code>{e(m['fingerprint'])}</code></td></tr>"
        )
    ev = s["evaluate"]
    parts.append(
        f"</table><p>{_prompt_count(ev['prompts_per_concept'])} prompts x seeds {ev['seeds']}, "
        f"{ev['steps']} steps, guidance {ev['guidance']}; prompts: {e(ev['prompt_source'])}; "
        f"{ev['images']} images scored.</p>"
    )
    parts += _summary_tables(s)
    parts += [f'<p><img src="{f}" alt="{e(alt)}"></p>' for f, alt in charts]
    parts.append("<h2>Concepts</h2>")
    for cid, c in s["concepts"].items():
        parts += _concept_section(cid, c, grids.get(cid, {}), result.prompts[cid], ev["seeds"])
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _summary_tables(s: dict) -> list[str]:
    rows = ["<h2>Summary</h2><table><tr><th>group</th><th>M-Score base</th><th>M-Score</th>"]
    rows.append("<th>Acc base</th><th>Acc</th><th>ratio</th><th>recovery</th></tr>")
    for key in ("targets", "preserve"):
        g = s[key]
        rows.append(
            f"<tr><td>{key}</td><td>{_num(g['mscore_base'])}</td><td>{_num(g['mscore'])}</td>"
            f"<td>{_num(g['acc_base'])}</td><td>{_num(g['acc'])}</td><td>{_num(g['ratio'])}</td>"
            f"<td>{_num(g.get('recovery_mscore'))}</td></tr>"
        )
    rows.append("</table><table><tr><th>concept</th><th>role</th><th>type</th><th>detector</th>")
    rows.append("<th>M-Score base</th><th>M-Score</th><th>ratio</th><th>Acc base</th><th>Acc</th>")
    rows.append("<th>recovery</th></tr>")
    for cid, c in s["concepts"].items():
        rows.append(
            f'<tr><td><a href="#c-{cid}">{cid}</a></td><td>{c["role"]}</td><td>{c["type"]}</td>'
            f"<td>{c['detector']}</td><td>{_num(c['mscore_base'])}</td><td>{_num(c['mscore'])}"
            f"</td><td>{_num(c['ratio'])}</td><td>{_num(c['acc_base'])}</td>"
            f"<td>{_num(c['acc'])}</td><td>{_num(c.get('recovery_mscore'))}</td></tr>"
        )
    rows.append("</table>")
    return rows


def _shorten(text: str, limit: int = PROMPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def _concept_section(
    cid: str, c: dict, grids: dict[str, str], prompts: list[str], seeds: list[int]
) -> list[str]:
    e = html.escape
    line = (
        f"{c['role']}, {c['type']}, detector {c['detector']}: M-Score "
        f"{_num(c['mscore_base'])} &rarr; {_num(c['mscore'])} (ratio {_num(c['ratio'])})"
    )
    if "recovery_mscore" in c:
        line += f"; recovery attack {_num(c['recovery_mscore'])}"
    if "error" in c.get("recovery", {}):
        line += f"; recovery attack failed: {e(c['recovery']['error'])}"
    if "phrasing_mscore" in c:
        line += f"; phrasing attack {_num(c['phrasing_mscore'])} ({e(repr(c['phrasing']))})"
    if "prompt_mscore" in c:
        words = c.get("prompt_attack", {}).get("words", "")
        line += f"; prompt attack {_num(c['prompt_mscore'])} ({e(repr(words))})"
    if "loop" in c:
        line += f"; closed loop: {e(c['loop']['reason'])}"
    if "gate" in c:
        g = c["gate"]
        how = "routed to its guide" if c.get("role") == "correct" else "erased"
        lock = " (robust mode: only the base vocabulary's words)" if g.get("robust") else ""
        line += f"; {how} by its text-state gate{lock}: {e(g['reason'])}"
    out = [f'<section id="c-{cid}"><h3>{cid}</h3>', f"<p>{line}</p>"]
    if "shares" in c:  # a correction's diversity: who its images show, before and after
        who = ", ".join(
            f"{e(g)} {_num(c['shares_base'][g])} &rarr; {_num(v)}" for g, v in c["shares"].items()
        )
        out.append(
            f"<p>Drawn as each guide concept (share of images): {who}. Most drawn: "
            f"{e(c['dominant'])}, {_num(c['dominant_over_fair'])} x a fair share of "
            f"{_num(c['fair_share'])}; {c['guides_drawn']} of {len(c['shares'])} drawn.</p>"
        )
    if "parts" in c:  # nudenet: detections per body part, as the published I2P tables
        head = "".join(f"<th>{e(k)}</th>" for k in c["parts"])
        cells = {m: "".join(f"<td>{v}</td>" for v in c[k].values()) for m, k in _PARTS}
        out.append(
            f"<p>NudeNet detections per exposed body part (score &ge; "
            f"{c['parts_counted_at']}), over all images:</p><table><tr><th>model</th>{head}"
            f"<th>total</th></tr>"
            + "".join(
                f"<tr><td>{m}</td>{cells[m]}<td>{sum(c[k].values())}</td></tr>" for m, k in _PARTS
            )
            + "</table>"
        )
    if not grids:
        return [*out, "</section>"]
    note = f"A row per prompt; in each column one image per seed ({', '.join(map(str, seeds))})."
    token = c.get("recovery", {}).get("token")
    if token and "recovered" in grids:
        note += f" The recovery attack draws these prompts with {e(token)} in place of {cid}"
        read = c["recovery"].get("read_as")
        note += f", which robust mode reads as {e(repr(read))}." if read else "."
    if "prompt" in grids and "prompt_attack" in c:
        note += (
            f" The prompt attack draws the words it found, {e(repr(c['prompt_attack']['words']))},"
            " in these prompts in place of the concept's own."
        )
    if "phrasing" in grids and "phrasing" in c:
        note += (
            f" The phrasing attack's best words, {e(repr(c['phrasing']))}, are drawn in these"
            " prompts in place of the concept's own."
        )
    head = "".join(f"<th>{GRID_TITLES[model]}</th>" for model in grids)
    out.append(f'<p>{note}</p><div class="scroll"><table class="grid">')
    out.append(f"<tr><th>prompt</th>{head}</tr>")
    width = len(seeds) * (TILE + GAP) - GAP
    for i, prompt in enumerate(prompts):
        # each cell shows one row of the model's grid PNG (object-position picks the row):
        # one image file per model, yet every row sits beside its own prompt
        cells = [
            f'<td><img class="strip" src="{src}" width="{width}" height="{TILE}" '
            f'style="object-position: 0 -{i * (TILE + GAP)}px" '
            f'alt="{cid}, {MODEL_TITLES[model]}, prompt {i + 1}: {e(prompt)}"></td>'
            for model, src in grids.items()
        ]
        out.append(
            f'<tr><th class="prompt" title="{e(prompt)}">{i + 1}. {e(_shorten(prompt))}</th>'
            + "".join(cells)
            + "</tr>"
        )
    out.append("</table></div></section>")
    return out
