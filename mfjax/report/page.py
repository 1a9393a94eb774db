"""One page, as Markdown and as self-contained HTML, from a list of blocks.

  ("heading", level, text)
  ("text", text)
  ("table", header, rows)            rows: lists of strings
  ("image", path, title, caption)    path relative to the page
  ("items", [text, ...])
  ("links", [(label, path), ...])
"""
import html as html_lib


def _md_cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(blocks: list) -> str:
  out = []
  for block in blocks:
    kind = block[0]
    if kind == "heading":
      out.append("#" * block[1] + " " + block[2])
    elif kind == "text":
      out.append(block[1])
    elif kind == "table":
      header, rows = block[1], block[2]
      lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
      lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
      out.append("\n".join(lines))
    elif kind == "image":
      out.append(f"![{block[2]}]({block[1]})\n\n*{block[3]}*")
    elif kind == "items":
      out.append("\n".join(f"- {item}" for item in block[1]))
    elif kind == "links":
      out.append(" · ".join(f"[{label}]({path})" for label, path in block[1]))
    else:
      raise ValueError(f"unknown block kind {kind!r}")
  return "\n\n".join(out) + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1em 0 2em; }
figcaption { color: #555; font-size: 0.9em; }
"""


def html(blocks: list, title: str) -> str:
  e = html_lib.escape
  out = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
         f"<style>{STYLE}</style></head><body>"]
  for block in blocks:
    kind = block[0]
    if kind == "heading":
      out.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
    elif kind == "text":
      out.append(f"<p>{e(block[1])}</p>")
    elif kind == "table":
      rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
      out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in block[1]) + f"</tr>{rows}</table>")
    elif kind == "image":
      out.append(f"<figure><img src='{e(block[1])}' alt='{e(block[2])}'><figcaption>{e(block[3])}</figcaption>"
                 "</figure>")
    elif kind == "items":
      out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
    elif kind == "links":
      out.append("<p>" + " · ".join(f"<a href='{e(path)}'>{e(label)}</a>" for label, path in block[1]) + "</p>")
    else:
      raise ValueError(f"unknown block kind {kind!r}")
  out.append("</body></html>")
  return "\n".join(out) + "\n"
