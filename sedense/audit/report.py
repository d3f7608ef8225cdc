"""The audit's report: CSVs a program reads, and one self-contained HTML page a person reads (thumbnails inline,
nothing fetched from a network)."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from sedense.runs import write_file

THUMB = 96  # pixels of a thumbnail's long side
SHOWN = 60  # rows of each section on the page (the CSVs hold every one)


def csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def thumbnail(path: str) -> str:
    """An ``<img>`` with the picture inline as a small JPEG, or a note when it cannot be read."""
    from PIL import Image

    from sedense.data.images import load_image

    try:
        img = load_image(path, short_side=THUMB)
        img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - the page shows what it can
        return '<span class="bad">unreadable</span>'
    data = base64.b64encode(out.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="" title="{html.escape(path)}">'


def figure(path: str, caption: str) -> str:
    return f"<figure>{thumbnail(path)}<figcaption>{html.escape(caption)}</figcaption></figure>"


STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}
h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
figure{display:inline-block;margin:4px;text-align:center;width:110px}figcaption{font-size:11px;word-break:break-all}
.bad{color:#b00}.note{color:#555}.row{display:flex;flex-wrap:wrap;align-items:flex-start}"""


def page(summary: dict, groups: list[dict], issues: list[dict], oddities: list[dict], label_note: str | None) -> str:
    """The HTML page: the summary, then duplicate groups, label issues and odd files, most important first."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sedense audit</title><style>{STYLE}</style>",
             "</head><body>", f"<h1>Audit of {html.escape(summary['root'])}</h1><table>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary["lines"].items()]
    parts.append("</table>")
    parts.append(f"<h2>Duplicate groups ({len(groups)})</h2>")
    for g in groups[:SHOWN]:
        flags = [f for f, on in (("crosses the split", g["crosses_split"]), ("different labels", g["labels_differ"]))
                 if on]
        parts.append(f"<p>group {g['group']}: {g['kind']}{'; ' + ', '.join(flags) if flags else ''}</p>"
                     "<div class='row'>")
        parts += [figure(m["path"], f"{m['class']} / {m['subset']}: {Path(m['path']).name}") for m in g["members"]]
        parts.append("</div>")
    parts.append(f"<h2>Label issues ({len(issues)})</h2>")
    if label_note:
        parts.append(f"<p class='note'>{html.escape(label_note)}</p>")
    parts.append("<div class='row'>")
    parts += [figure(i["path"], f"#{i['rank']} filed {i['label']}, looks like {i['looks_like']}")
              for i in issues[:SHOWN]]
    parts.append(f"</div><h2>Odd files ({len(oddities)})</h2><div class='row'>")
    parts += [figure(o["path"], f"{o['reason']}: {Path(o['path']).name}") for o in oddities[:SHOWN]]
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write_report(out: Path, summary: dict, groups: list[dict], issues: list[dict], oddities: list[dict],
                 label_note: str | None) -> list[Path]:
    """``duplicates.csv``, ``label_issues.csv``, ``outliers.csv`` and ``audit.html`` in ``out``."""
    written = [out / "duplicates.csv", out / "label_issues.csv", out / "outliers.csv", out / "audit.html"]
    write_file(written[0], csv_text(
        ["group", "kind", "crosses_split", "labels_differ", "path", "class", "subset"],
        [[g["group"], g["kind"], g["crosses_split"], g["labels_differ"], m["path"], m["class"], m["subset"]]
         for g in groups for m in g["members"]]))
    write_file(written[1], csv_text(["rank", "path", "label", "looks_like", "label_probability", "subset"],
                                    [[i[k] for k in ("rank", "path", "label", "looks_like", "label_probability",
                                                     "subset")] for i in issues]))
    write_file(written[2], csv_text(["path", "class", "subset", "reason", "value"],
                                    [[o[k] for k in ("path", "class", "subset", "reason", "value")]
                                     for o in oddities]))
    write_file(written[3], page(summary, groups, issues, oddities, label_note))
    return written
