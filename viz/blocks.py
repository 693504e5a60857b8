"""The report's building blocks and their two renderings: markdown and self-contained HTML.

Both renderings come from one list of blocks so they always say the same thing; the HTML embeds
every figure as a base64 PNG so it can be mailed or opened from the MLflow UI on its own.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

FIGURES_DIR = "figures"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Warn:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file under figures/
    caption: str


Block = Heading | Para | Warn | Table | Figure


# ---------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Markdown with images linked relative to the artifact root (figures/…)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Warn):
            out.append(f"> **Warning:** {block.text}")
        elif isinstance(block, Table):
            if not block.rows:
                continue
            out.append("| " + " | ".join(map(_md_cell, block.headers)) + " |")
            out.append("|" + "---|" * len(block.headers))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
        elif isinstance(block, Figure):
            out.append(f"![{block.caption}]({FIGURES_DIR}/{block.name})")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the two markdown spans the report uses: `code` and **bold**."""
    escaped = html.escape(text)
    parts = escaped.split("`")
    escaped = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d2330; line-height: 1.5; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3b6bb5; padding-bottom: 6px; }
h2 { font-size: 1.25em; margin-top: 2em; color: #24457a; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
code { background: #eef1f5; padding: 1px 4px; border-radius: 3px; font-size: 0.92em; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.93em; }
th, td { border: 1px solid #d3d8e0; padding: 4px 10px; text-align: left; }
th { background: #e3eaf5; }
tr:nth-child(even) td { background: #f8f9fb; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e0e3e8; }
figcaption { font-size: 0.88em; color: #5a6372; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: 8px 12px; margin: 10px 0; }
"""


def render_html(blocks: list[Block], figures_dir: Path) -> str:
    """One HTML file; every figure embedded as a base64 data URI."""
    body: list[str] = []
    title = "FER2013 model report"
    for block in blocks:
        if isinstance(block, Heading):
            if block.level == 1:
                title = block.text
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Warn):
            body.append(f'<div class="warn"><strong>Warning:</strong> {_inline(block.text)}</div>')
        elif isinstance(block, Table):
            if not block.rows:
                continue
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Figure):
            path = figures_dir / block.name
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = html.escape(block.caption, quote=True)
            body.append(
                f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        "<body><main>\n" + "\n".join(body) + "\n</main></body>\n</html>\n"
    )


def write_blocks(
    blocks: list[Block], root: Path, md_name: str, html_name: str
) -> tuple[Path, Path]:
    """Write both renderings into `root` (figures already under root/figures)."""
    figures_dir = root / FIGURES_DIR
    missing = [
        b.name for b in blocks if isinstance(b, Figure) and not (figures_dir / b.name).exists()
    ]
    if missing:
        raise FileNotFoundError(f"report: expected figures under {figures_dir}, missing {missing}")
    md_path, html_path = root / md_name, root / html_name
    md_path.write_text(render_markdown(blocks), encoding="utf-8")
    html_path.write_text(render_html(blocks, figures_dir), encoding="utf-8")
    return md_path, html_path
