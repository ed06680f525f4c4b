"""The sweep report's two pages from its parts (pure formatting): `markdown_page` (report.md) and
`html_page` (report.html: one self-contained file, images inlined, sortable tables, no scripts
from elsewhere). `raykd.report` computes the parts: summary lines, tables, image paths.
"""

from __future__ import annotations

import base64
import html


def markdown_page(summary, tables, images) -> str:
    lines = ["# raykd sweep report", "", *(f"- {s}" for s in summary), ""]
    for title, head, rows, mark in tables:
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none)", ""]
            continue
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [c.replace("|", "\\|") for c, _ in r]
            if r[0][0] in mark:
                cells[0] = f"**{cells[0]}**"
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Bold trial ids are on a Pareto front.", ""] if mark else [""]
    lines += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in images.items()]
    return "\n".join(lines) + "\n"


_JS = """function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0];
const asc=th.dataset.asc!=='1';t.querySelectorAll('th').forEach(h=>{delete h.dataset.asc;h.classList.remove('up','down')});
th.dataset.asc=asc?'1':'0';th.classList.add(asc?'up':'down');
const key=r=>{const c=r.children[i],v=c.dataset.v;return v!==undefined?[0,parseFloat(v)]:c.textContent===''?[2,'']:[1,c.textContent]};
[...b.rows].sort((p,q)=>{const a=key(p),c=key(q);if(a[0]!==c[0]||a[0]===2)return a[0]-c[0];
return (a[1]>c[1]?1:a[1]<c[1]?-1:0)*(asc?1:-1)}).forEach(r=>b.appendChild(r));}"""

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}h1{margin-top:0}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#eef;cursor:pointer;user-select:none;white-space:nowrap}th.up::after{content:' \\25B2'}th.down::after{content:' \\25BC'}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.front td{background:#fff2cc}tr.front td:first-child{font-weight:bold}
tr.ERROR td{color:#888}td.err{color:#b00020;min-width:18em;max-width:40em}.scroll{overflow-x:auto}.note{color:#555;font-size:13px}
figure{display:inline-block;margin:6px;vertical-align:top}figure img{max-width:640px;border:1px solid #ddd}
figcaption{font-size:12px;color:#555}"""


def html_page(summary, tables, images) -> str:
    def md_code(s: str) -> str:  # `x` -> <code>x</code> after escaping
        parts = html.escape(s).split("`")
        return "".join(f"<code>{p}</code>" if k % 2 else p for k, p in enumerate(parts))

    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>raykd sweep report</title>",
           f"<style>{_CSS}</style><script>{_JS}</script></head><body><h1>raykd sweep report</h1><ul>"]
    out += [f"<li>{md_code(s)}</li>" for s in summary]
    out.append("</ul>")
    for title, head, rows, mark in tables:
        out.append(f"<h2>{html.escape(title)}</h2>")
        if not rows:
            out.append("<p class='note'>(none)</p>")
            continue
        if mark:
            out.append("<p class='note'>Highlighted rows are on a Pareto front. Click a column header to sort.</p>")
        out.append("<div class='scroll'><table><thead><tr>" + "".join(f"<th onclick='sortBy(this)'>{html.escape(h)}</th>" for h in head)
                   + "</tr></thead><tbody>")
        for r in rows:
            cls = " ".join(c for c in ("front" if r[0][0] in mark else "", r[1][0]) if c)
            tds = []
            for k, (text, v) in enumerate(r):
                err = k == len(head) - 1 and head[-1] == "error"
                attrs = f" class='num' data-v='{v!r}'" if v is not None else " class='err'" if err else ""
                tds.append(f"<td{attrs}>{html.escape(text)}</td>")
            out.append(f"<tr class='{html.escape(cls)}'>" + "".join(tds) + "</tr>")
        out.append("</tbody></table></div>")
    out.append("<h2>Plots</h2>")
    for k, p in images.items():
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        out.append(f"<figure><img alt='{k}' src='data:image/png;base64,{data}'><figcaption>{k} ({p.name})</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
