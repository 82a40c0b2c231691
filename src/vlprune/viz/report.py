"""The report: ``report.md`` and ``report.html`` with a table, a plot and overlay images.

    write_report("runs/demo", "vlprune demo", rows, columns=[("method", "method", ""), ("vqa_acc", "VQA acc", ".3f")],
                 figures=[Figure("tradeoff.png", "accuracy against throughput")], notes=["CPU only, 2 cores"])

Images are referenced by paths relative to the report directory (files outside it are copied in), so the
directory can be moved or zipped as a whole. The HTML is a single static page with inline CSS.
"""

from __future__ import annotations

import html
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

Column = Tuple[Union[str, Callable[[Dict], object]], str, str]  # (row key or function of the row, header, format)


@dataclass(frozen=True)
class Figure:
    """An image (PNG) with a caption, shown below the table."""

    path: Union[str, Path]
    caption: str = ""


def format_cell(value, fmt: str = "") -> str:
    """A table cell: None / NaN -> "n/a", numbers with ``fmt``, lists joined with ">" (token counts), dicts of
    lists by group."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {format_cell(v, fmt)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ">".join(format_cell(v, fmt) for v in value)
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def default_columns(rows: Sequence[Dict]) -> List[Column]:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return [(k, k, ".4g" if any(isinstance(r.get(k), float) for r in rows) else "") for k in keys]


def table_cells(rows: Sequence[Dict], columns: Optional[Sequence[Column]] = None) -> Tuple[List[str], List[List[str]]]:
    cols = list(columns) if columns is not None else default_columns(rows)
    get = lambda r, k: r.get(k) if isinstance(k, str) else k(r)  # noqa: E731
    return [h for _, h, _ in cols], [[format_cell(get(r, k), f) for k, _, f in cols] for r in rows]


def markdown_table(rows: Sequence[Dict], columns: Optional[Sequence[Column]] = None) -> str:
    headers, body = table_cells(rows, columns)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def html_table(rows: Sequence[Dict], columns: Optional[Sequence[Column]] = None) -> str:
    headers, body = table_cells(rows, columns)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


def _place(path: Union[str, Path], out_dir: Path) -> str:
    """The figure's path relative to ``out_dir``, copying it into ``out_dir/figures`` when it lies outside."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"report figure not found: {p}")
    try:
        return p.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        dest = out_dir / "figures" / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        return dest.relative_to(out_dir).as_posix()


def bench_columns(train: bool = False) -> List[Column]:
    """Columns for the rows of ``vlprune.bench.run_bench`` (inference, or ``train=True`` for ``--train`` rows)."""
    from ..reduce.trace import compact_tokens

    cols: List[Column] = [("label", "method", ""), ("gflops_image", "GFLOPs image", ".2f"),
                          ("gflops_total", "GFLOPs total", ".2f"), ("gflops_select", "GFLOPs select", ".3f"),
                          (lambda r: compact_tokens(r["tokens_per_layer"]), "tokens", ""), ("batch_size", "batch", "")]
    if train:
        cols += [("gflops_step", "GFLOPs step", ".2f"), ("step_ms", "step ms", ".1f"), ("max_batch", "max batch", "")]
    else:
        cols += [("latency_ms", "latency ms", ".1f")]
    return cols + [("throughput", "pairs/s", ".2f"), ("peak_mem_mb", "peak MB", ".0f"), ("speedup", "speed-up", ".2f"),
                   ("ideal_speedup", "FLOPs-ideal", ".2f"), ("speedup_ratio", "measured/ideal", ".2f")]


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}figure{margin:1.5em 0}"
        "img{max-width:100%}figcaption,.cap{color:#555;font-size:0.9em}")


@dataclass(frozen=True)
class Table:
    rows: Sequence[Dict]
    columns: Optional[Sequence[Column]] = None
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """A part of a report: a heading, then paragraphs, bullet points, tables and figures, in that order."""

    heading: str
    text: Sequence[str] = ()
    bullets: Sequence[str] = ()
    tables: Sequence[Table] = ()
    figures: Sequence[Figure] = ()


def write_sections(out_dir: Union[str, Path], title: str, sections: Sequence[Section]) -> Tuple[Path, Path]:
    """Write ``out_dir/report.md`` and ``out_dir/report.html`` made of ``sections``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    e = html.escape
    md, body = [f"# {title}", ""], [f"<h1>{e(title)}</h1>"]
    for s in sections:
        md += [f"## {s.heading}", ""]
        body.append(f"<h2>{e(s.heading)}</h2>")
        for t in s.text:
            md += [t, ""]
            body.append(f"<p>{e(t)}</p>")
        if s.bullets:
            md += [f"- {b}" for b in s.bullets] + [""]
            body.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in s.bullets) + "</ul>")
        for t in s.tables:
            md += [markdown_table(t.rows, t.columns), ""] + ([f"*{t.caption}*", ""] if t.caption else [])
            body.append(html_table(t.rows, t.columns) + (f"<p class=\"cap\">{e(t.caption)}</p>" if t.caption else ""))
        for f in s.figures:
            rel = _place(f.path, out)
            md += [f"![{f.caption}]({rel})", "", f"*{f.caption}*" if f.caption else "", ""]
            body.append(f'<figure><img src="{e(rel)}" alt="{e(f.caption)}"><figcaption>{e(f.caption)}</figcaption></figure>')
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
                         f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return md_path, html_path


def write_report(
    out_dir: Union[str, Path],
    title: str,
    rows: Sequence[Dict],
    columns: Optional[Sequence[Column]] = None,
    figures: Sequence[Figure] = (),
    notes: Sequence[str] = (),
    sections: Sequence[Tuple[str, str]] = (),
) -> Tuple[Path, Path]:
    """Write ``out_dir/report.md`` and ``out_dir/report.html``; returns their paths.

    rows/columns: the main table (columns = (key, header, format) triples; default: every key). figures: plots and
    overlays, in order. notes: bullet points under the title (hardware, what was measured). sections: extra
    (heading, plain text) pairs at the end (shown preformatted in HTML, e.g. the exact command and raw table).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = [(_place(f.path, out), f.caption) for f in figures]
    md = [f"# {title}", ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += [markdown_table(rows, columns), ""]
    for rel, cap in figs:
        md += [f"![{cap}]({rel})", "", f"*{cap}*" if cap else "", ""]
    for head, text in sections:
        md += [f"## {head}", "", "```", text.rstrip(), "```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    if notes:
        body.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    body.append(html_table(rows, columns))
    for rel, cap in figs:
        body.append(f'<figure><img src="{e(rel)}" alt="{e(cap)}"><figcaption>{e(cap)}</figcaption></figure>')
    for head, text in sections:
        body.append(f"<h2>{e(head)}</h2><pre>{e(text)}</pre>")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    html_path = out / "report.html"
    html_path.write_text(page)
    return md_path, html_path


__all__ = ["Figure", "Table", "Section", "write_sections", "write_report", "bench_columns", "markdown_table", "html_table", "format_cell"]
