"""Task: write the report folder and publish it as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from fmn.run.stages import ReportRecord, ScoreRecord, stage_report


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def mscore_table(summary: dict) -> list[dict]:
    """One row per concept: what the artifact table and the console show."""
    return [
        {
            "concept": cid,
            "role": c["role"],
            "type": c["type"],
            "status": c.get("status", "ok"),
            "M-Score base": _num(c["mscore_base"]),
            "M-Score merged": _num(c["mscore"]),
            "ratio": _num(c["ratio"]),
        }
        for cid, c in summary["concepts"].items()
    ]


def summary_markdown(summary: dict, index: str) -> str:
    gates = summary["gates"]
    verdict = "**passed**" if gates["passed"] else "**FAILED**"
    t, p = summary["targets"], summary["preserve"]
    lines = [
        f"# {summary['name']}: gates {verdict}",
        "",
        f"- targets: mean M-Score {_num(t['mscore_base'])} -> {_num(t['mscore'])}",
        f"- preserved: mean ratio to base {_num(p['ratio'])}",
        f"- report: [index.html]({Path(index).resolve().as_uri()}) ({index})",
    ]
    lines += [f"- gate failed: {f['message']}" for f in gates["failures"]]
    return "\n".join(lines) + "\n"


# Not cached: it is cheap, and each flow run should publish its own artifacts.
@task(name="report", cache_policy=NO_CACHE, persist_result=False, tags=["fmn"])
def report(run: str, scored: ScoreRecord, out: str) -> ReportRecord:
    """fmn.run.stages.stage_report, then a table artifact of M-Scores and a markdown summary
    that links the HTML report."""
    rec = stage_report(run, scored, out)
    s = rec["summary"]
    create_table_artifact(
        mscore_table(s), key=f"{s['name']}-mscore", description=f"M-Scores of {s['name']}"
    )
    create_markdown_artifact(
        summary_markdown(s, rec["index"]),
        key=f"{s['name']}-summary",
        description=f"Build summary of {s['name']}",
    )
    return rec
