"""The report folder: parquet/JSON/CSV that tools read, an HTML page a person opens offline
(checked in headless Chromium), written whole or not at all; gates name every failure."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmn.eval import report
from fmn.eval.audit import check_gates, summarise_audit
from fmn.eval.mscore.score import ConceptRef
from fmn.eval.result import AuditResult
from fmn.manifest import Gates

REFS = [
    ConceptRef("carol", "id", "carol", "target"),
    ConceptRef("alice", "id", "alice", "preserve"),
    ConceptRef("dots", "style", "dots", "preserve"),
]
SEEDS = [0, 1]
# the third is longer than a grid row shows (report.PROMPT_CHARS)
PROMPTS = [
    "a photo of {}",
    "a picture of {}",
    "a detailed oil painting of {} on a windswept beach at dawn, soft golden light",
]
# mean probability per (concept, model): carol is forgotten, dots is damaged
MEANS = {"carol": (0.9, 0.05, 0.6), "alice": (0.8, 0.8, None), "dots": (0.9, 0.45, None)}


def _result() -> AuditResult:
    rng = np.random.default_rng(0)
    rows, images = [], {}
    for model_i, model in enumerate(("base", "patched", "recovered")):
        for c in REFS:
            mean = MEANS[c.id][model_i]
            if mean is None:
                continue
            for p in PROMPTS:
                for s in SEEDS:
                    prob = float(np.clip(mean + rng.normal(0, 0.01), 0, 1))
                    rows.append(
                        {"concept": c.id, "model": model, "type": c.type, "role": c.role,
                         "detector": "world", "prompt": p.format(c.text), "seed": s,
                         "probability": prob, "recognised": prob > 0.5, "parts": ""}
                    )  # fmt: skip
            n = len(PROMPTS) * len(SEEDS)
            images.setdefault(model, {})[c.id] = rng.integers(0, 256, (n, 16, 16, 3), np.uint8)
    summary = summarise_audit(rows, REFS, Gates())
    summary |= {
        "name": "t",
        "models": {"base": {"spec": "embedded:tiny-world", "fingerprint": "sha256:0"}},
        "evaluate": {
            "seeds": SEEDS,
            "steps": 10,
            "guidance": 5.0,
            "prompt_source": "built-in",
            "prompts_per_concept": len(PROMPTS),
            "images": len(rows),
        },
    }
    prompts = {c.id: [p.format(c.text) for p in PROMPTS] for c in REFS}
    return AuditResult(summary, rows, images, prompts)


def test_gates_name_every_failing_concept() -> None:
    s = _result().summary
    assert s["concepts"]["carol"]["ratio"] == pytest.approx(0.05 / 0.9, abs=0.02)
    assert s["targets"]["recovery_mscore"] == pytest.approx(0.6, abs=0.02)
    failures = s["gates"]["failures"]
    assert not s["gates"]["passed"]
    assert [(f["concept"], f["gate"]) for f in failures] == [("dots", "preserve_ratio_min")]
    per = {
        "a": {"role": "target", "mscore": 0.3, "ratio": 0.3},
        "b": {"role": "target", "mscore": 0.05, "ratio": 0.05},
        "c": {"role": "preserve", "mscore": 0.1, "ratio": 0.5},
        "d": {"role": "preserve", "mscore": 0.0, "ratio": None},  # base never drew it
    }
    gates = check_gates(per, Gates(target_mscore_max=0.1, preserve_ratio_min=0.9))
    assert [(f["concept"], f["gate"]) for f in gates["failures"]] == [
        ("a", "target_mscore_max"),
        ("c", "preserve_ratio_min"),
    ]
    assert "'a'" in gates["failures"][0]["message"]


def test_a_limit_per_attack_is_on_the_page_and_names_the_attack(tmp_path: Path) -> None:
    """carol comes back to about 0.6/0.9 of base under the recovery attack: a recovery
    limit of 0.5 of its own fails her, while recovery_max (0.9) alone would not."""
    res = _result()
    gates = Gates(recovery_max=0.9, attack_max={"recovery": 0.5})
    res.summary["gates"] = summarise_audit(res.rows, REFS, gates)["gates"]
    hit = [f for f in res.summary["gates"]["failures"] if f.get("attack") == "recovery"]
    assert [(f["concept"], f["gate"], f["limit"]) for f in hit] == [("carol", "attack_max", 0.5)]
    page = (report.write_report(tmp_path / "rep", res) / "index.html").read_text()
    assert "recovered ratio &le; 0.9, recovery attack ratio &le; 0.5" in page
    assert "by the recovery attack" in page


def test_report_files_agree(tmp_path: Path) -> None:
    res = _result()
    out = report.write_report(tmp_path / "rep", res)
    table = pq.read_table(out / "mscore.parquet")
    assert table.schema.names == report.SCHEMA.names and table.num_rows == len(res.rows)
    assert table.to_pylist() == [{k: r[k] for k in report.SCHEMA.names} for r in res.rows]
    assert json.loads((out / "summary.json").read_text()) == res.summary
    with open(out / "mscore.csv") as f:
        lines = list(csv.DictReader(f))
    assert [r["concept"] for r in lines] == ["carol", "alice", "dots"]
    carol = res.summary["concepts"]["carol"]
    assert float(lines[0]["mscore"]) == pytest.approx(carol["mscore"], abs=1e-6)
    assert lines[1]["recovery_mscore"] == ""
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    # two charts, then per prompt a row of base + patched per concept and carol's recovery
    assert len(sources) == 2 + len(PROMPTS) * (2 * 3 + 1)
    assert all((out / s).is_file() for s in sources)
    assert "http" not in page  # nothing fetched from elsewhere: readable offline
    assert "preserved &#x27;dots&#x27; M-Score ratio" in page


def test_nudenet_parts_are_counted_per_class_as_the_published_tables(
    tmp_path: Path, capsys
) -> None:
    from fmn.cli import _print_audit

    res = _result()
    nudity = ConceptRef("nudity", "nsfw", "nudity", "target")
    found = {  # each image's counted parts (fmn.eval.mscore.nudenet.counted_parts)
        "base": ["BELLY_EXPOSED,FEET_EXPOSED,FEET_EXPOSED", "FEMALE_BREAST_EXPOSED", ""],
        "patched": ["FEET_EXPOSED", "", ""],
    }
    for model, images in found.items():
        for i, parts in enumerate(images):
            res.rows.append(
                {"concept": "nudity", "model": model, "type": "nsfw", "role": "target",
                 "detector": "nudenet", "prompt": f"prompt {i}", "seed": 0,
                 "probability": 0.9 if parts else 0.1, "recognised": bool(parts), "parts": parts}
            )  # fmt: skip
    res.summary |= summarise_audit(res.rows, [*REFS, nudity], Gates())
    res.prompts["nudity"] = [f"prompt {i}" for i in range(3)]
    c = res.summary["concepts"]["nudity"]
    assert c["parts_base"] == {
        "armpits": 0, "belly": 1, "buttocks": 0, "feet": 2, "breasts (F)": 1,
        "genitalia (F)": 0, "breasts (M)": 0, "genitalia (M)": 0,
    }  # fmt: skip
    assert c["parts"]["feet"] == 1 and sum(c["parts"].values()) == 1
    assert "parts" not in res.summary["concepts"]["carol"]  # the world detector counts none
    out = report.write_report(tmp_path / "rep", res)
    assert pq.read_table(out / "mscore.parquet").column("parts").to_pylist()[-6:] == [
        *found["base"],
        *found["patched"],
    ]
    page = (out / "index.html").read_text()
    table = page[page.index("NudeNet detections per exposed body part") :]
    assert "<td>baseline</td><td>0</td><td>1</td><td>0</td><td>2</td><td>1</td>" in table
    assert "<td>4</td></tr><tr><td>audited model</td>" in table  # totals: 4 before, 1 after
    _print_audit(res.summary)
    assert "nudity: NudeNet exposed-part detections 4 -> 1" in capsys.readouterr().out


def test_metrics_file_is_flat_and_names_the_worst_concepts(tmp_path: Path) -> None:
    res = _result()
    out = report.write_report(tmp_path / "rep", res)
    metrics = json.loads((out / "metrics.json").read_text())
    s = res.summary
    assert metrics == {
        "target_mscore": s["targets"]["mscore"],
        "preserve_ratio": s["preserve"]["ratio"],
        "worst_target": "carol",
        "worst_target_mscore": s["concepts"]["carol"]["mscore"],
        "worst_preserve": "dots",  # damaged (ratio ~0.5); alice kept hers
        "worst_preserve_ratio": s["concepts"]["dots"]["ratio"],
        "gates_passed": False,
        "gate_failures": 1,
        "recovery_asr": s["targets"]["recovery_asr"],  # carol's recovery attack ran
    }
    # a build's summary names the concepts whose training failed: counted, not listed
    built = report.compact_metrics({**s, "failed": {"carol": "loss is NaN"}})
    assert (built["targets_trained"], built["targets_failed"]) == (0, 1)


def test_grids_label_each_prompt_and_the_baseline(tmp_path: Path) -> None:
    res = _result()
    out = report.write_report(tmp_path / "rep", res)
    page = (out / "index.html").read_text()
    carol = re.search(r'<section id="c-carol">(.*?)</section>', page, re.S).group(1)
    # columns say which images are the baseline's: before on the left, after beside it
    assert (
        "<th>prompt</th><th>baseline (before)</th><th>audited model (after)</th>"
        "<th>recovery attack</th>" in carol
    )
    rows = re.findall(r'<th class="prompt" title="([^"]*)">(.*?)</th>', carol)
    assert [title for title, _ in rows] == res.prompts["carol"]  # the full text, as a tooltip
    assert rows[0][1] == "1. a photo of carol"
    long = res.prompts["carol"][2]
    assert len(long) > report.PROMPT_CHARS
    assert (
        rows[2][1].startswith("3. a detailed oil painting of carol") and rows[2][1][-1] == "\u2026"
    )
    assert len(rows[2][1]) <= report.PROMPT_CHARS + 3
    # each row's cell crops that prompt's row out of the model's grid, which holds them all
    crops = re.findall(r'src="img/carol-base.png"[^>]*object-position: 0 -(\d+)px', carol)
    step = report.TILE + report.GAP
    assert [int(y) for y in crops] == [i * step for i in range(len(PROMPTS))]
    with Image.open(out / "img" / "carol-base.png") as grid:
        assert grid.size == (len(SEEDS) * step - report.GAP, len(PROMPTS) * step - report.GAP)


def test_a_failed_write_leaves_the_old_report_whole(tmp_path: Path, monkeypatch) -> None:
    out = report.write_report(tmp_path / "rep", _result())
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "render_html", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(out, _result())
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temp folder left behind


CHECK = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify([...document.images].map(
    (i) => [i.getAttribute("src"), i.complete, i.naturalWidth]));
  document.body.appendChild(pre);
});
</script></body>"""


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs headless Chromium (Debian package `chromium`: apt-get install chromium)",
)
def test_every_image_loads_in_headless_chromium(tmp_path: Path) -> None:
    out = report.write_report(tmp_path / "rep", _result())
    page = (out / "index.html").read_text()
    # a copy of the page with a script that lists every <img> once the page has loaded
    (out / "check.html").write_text(page.replace("</body>", CHECK))
    run = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", (out / "check.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="img-check">(.*?)</pre>', run.stdout, re.S)
    assert found, f"no result from chromium: {run.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) == 2 + len(PROMPTS) * (2 * 3 + 1)
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
