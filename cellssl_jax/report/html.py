"""One self-contained HTML page from a run folder.

The report only reads what the run wrote: ``summary.json`` (the run's own record of each stage: what ran, its
outputs and figures) and the PNG/CSV/JSON files it names. Every number on the page comes from one of those files, and
the page says which. Images are embedded, so the HTML can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} .src{color:#888;font-size:.8em} .ok{color:#1a7f37} .bad{color:#b42318}
figure{margin:1em 0} figcaption{font-size:.85em;color:#555}
"""


def _img(path: Path, caption: str) -> str:
    if not path.exists():
        return f'<p class="bad">missing figure: {html.escape(str(path))}</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)} <span class="src">({html.escape(path.name)})</span></figcaption></figure>')


def _table(df: pd.DataFrame, source: Path, max_rows: int = 40) -> str:
    body = df.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    more = f"<p class='src'>first {max_rows} of {len(df)} rows</p>" if len(df) > max_rows else ""
    return body + more + f'<p class="src">source: {html.escape(str(source))}</p>'


def _kv(d: dict, source: Path) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table><p class='src'>source: {html.escape(str(source))}</p>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)[:300]
    return str(v)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``run_dir/summary.json`` and the files it names into ``run_dir/report.html``."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found: run `make demo` (or cellssl_jax.demo) first")
    summary = json.loads(summary_path.read_text())
    parts = [f"<h1>cellssl-jax run report</h1><p>{html.escape(str(run_dir.resolve()))}</p>"]
    for stage in summary.get("stages", []):
        parts.append(f"<h2>{html.escape(stage['title'])}</h2>")
        if stage.get("text"):
            parts.append(f"<p>{html.escape(stage['text'])}</p>")
        if stage.get("figures_of_merit"):
            parts.append(_kv(stage["figures_of_merit"], summary_path))
        for t in stage.get("tables", []):
            path = run_dir / t["path"]
            if path.exists():
                parts.append(f"<h3>{html.escape(t['title'])}</h3>")
                parts.append(_table(pd.read_csv(path), path.relative_to(run_dir), t.get("max_rows", 40)))
        for f in stage.get("figures", []):
            parts.append(_img(run_dir / f["path"], f["caption"]))
        if "seconds" in stage:
            parts.append(f"<p class='src'>stage time: {stage['seconds']:.1f} s</p>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>cellssl-jax report</title>" \
           f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page)
    return out
