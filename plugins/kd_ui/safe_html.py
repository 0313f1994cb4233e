"""What keeps script out of the Airflow origin: the response headers of the KD view, and
stored HTML (GX Data Docs) made inert before it is served.

The plugin is served from the API server's origin, so a page that ran script there could
call the REST API with the viewer's session cookie. Two kinds of response:

* The view's own pages (kd_ui.pages) are server-rendered with every value escaped and have
  no script: PAGE_CSP allows inline styles and same-origin images (the report's plots),
  nothing else, and lets only the Airflow UI (same origin) frame them.
* Stored artifacts (Data Docs, plots, CSVs, report.md, anything a manifest lists) are
  data, whoever wrote them: GX Data Docs print column names and values unescaped, and load
  jQuery, bootstrap and vega from public CDNs. ARTIFACT_CSP serves them ``sandbox``ed
  (no ``allow-scripts``, no ``allow-same-origin``: an opaque origin that can neither run
  script nor read the cookie's origin) and lets them load nothing at all (no style sheet,
  image or font from any origin, this one included: an ``<img src=/api/v2/...>`` in a
  column name makes no request). ``inert_html`` also rewrites the HTML itself, so the page
  names no other origin and holds no script even for a browser that ignored the policy.

Every response also gets ``X-Content-Type-Options: nosniff`` (a CSV or JSON body is never
sniffed into HTML). The stored bytes are untouched (the quality record keeps its digests);
only what is served is rewritten.
"""

from __future__ import annotations

import ast
import re
from html import escape
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'self'; "
            "base-uri 'none'; form-action 'none'")
ARTIFACT_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; "
                "base-uri 'none'; form-action 'none'")
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
HTML_TYPES = ("text/html", "application/xhtml+xml")

# Elements dropped with their content (script) or without it (the tag only; its text stays).
_DROP_WITH_CONTENT = {"script"}
_DROP_TAG = {"base", "iframe", "frame", "frameset", "object", "embed", "applet", "portal", "form", "input",
             "button", "select", "textarea", "option"}
# Attributes holding a URL: kept only when the URL stays inside the artifact's own folder.
_URL_ATTRS = {"href", "src", "action", "formaction", "poster", "data", "background", "xlink:href", "ping",
              "cite", "longdesc", "manifest", "codebase", "lowsrc", "dynsrc", "usemap"}
_ALWAYS_DROPPED_ATTRS = {"srcset", "imagesrcset", "http-equiv", "integrity", "crossorigin"}
_VOID = {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr", "param"}
# GX shows a check's status as a Font Awesome icon (a CDN font): written out as a glyph instead
_ICONS = {"fa-check-circle": ("\u2714", "#276749"), "fa-times": ("\u2718", "#c53030"),
          "fa-exclamation-triangle": ("\u26a0", "#b7791f")}
_TAG = re.compile(r"^[a-z][a-z0-9:-]*$")
_ATTR = re.compile(r"^[a-z_:][a-z0-9_:.-]*$")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_FOLDER = "http://artifact.invalid/partition/"  # stands for the folder of the partition's files


def local_url(url: str, name: str) -> bool:
    """True when ``url``, written in the artifact ``name`` (a path inside its partition),
    stays inside that partition: relative, no scheme (``javascript:``, ``data:``,
    ``https:``), no ``//host`` or ``/path``, no ``..`` out of the folder. Browsers drop
    ASCII whitespace and control characters from URLs; so does the check."""
    u = _CONTROL.sub("", url)
    if not u or u.startswith("#"):
        return True
    if _SCHEME.match(u) or u.startswith(("/", "\\")) or "\\" in u:
        return False
    joined = urljoin(_FOLDER + name, u)
    return joined.startswith(_FOLDER) and urlsplit(joined).netloc == urlsplit(_FOLDER).netloc


class _Inert(HTMLParser):
    """Re-serializes a document from its tokens: every start tag is rebuilt from its parsed
    attributes (quoted and escaped), text is re-escaped, comments and processing
    instructions are dropped. What the browser then parses is what was checked here, so a
    quirk of the source's markup cannot hide an attribute from the rules below."""

    def __init__(self, name: str, tables: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]):
        super().__init__(convert_charrefs=True)
        self.name = name
        self.tables = tables
        self.out: list[str] = []
        self.skip = 0  # inside an element dropped with its content
        self.raw = False  # inside <style> (CSS is emitted as it came, but for "<")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, close=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, close=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], close: bool) -> None:
        if tag in _DROP_WITH_CONTENT:
            if not close:
                self.skip += 1
            return
        if self.skip or tag in _DROP_TAG or not _TAG.fullmatch(tag):
            return
        if tag == "meta" and any(k == "http-equiv" for k, _ in attrs):
            return  # a refresh would navigate away; a CSP meta would only narrow ours
        kept = []
        for k, v in attrs:
            if k.startswith("on") or k in _ALWAYS_DROPPED_ATTRS or not _ATTR.fullmatch(k):
                continue
            if k in _URL_ATTRS and v is not None and not local_url(v, self.name):
                if tag == "link":
                    return  # a style sheet or icon of another origin: the element is useless
                continue
            kept.append(k if v is None else f'{k}="{escape(v, quote=True)}"')
        self.out.append("<" + " ".join([tag, *kept]) + (" />" if close and tag not in _VOID else ">"))
        if tag == "style" and not close:
            self.raw = True
        if tag == "i":
            for c in (dict(attrs).get("class") or "").split():
                if c in _ICONS:
                    glyph, color = _ICONS[c]
                    self.out.append(f'<span style="color:{color}">{glyph}</span>')
        if tag == "table" and not close:
            table_id = dict(attrs).get("id")
            if table_id in self.tables:
                self.out.append(_rows(*self.tables[table_id], self.name))

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_WITH_CONTENT:
            self.skip = max(0, self.skip - 1)
            return
        if tag == "style":
            self.raw = False
        if not self.skip and tag not in _DROP_TAG and tag not in _VOID and _TAG.fullmatch(tag):
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            # CSS needs no "<": escaped, a <style> that the browser parses as markup (inside
            # <svg>) cannot open a tag either
            self.out.append(data.replace("<", "\\3c ") if self.raw else escape(data, quote=False))

    def handle_decl(self, decl: str) -> None:
        if decl.lower().startswith("doctype"):
            self.out.append("<!DOCTYPE html>")


def inert_html(body: bytes, name: str) -> bytes:
    """``body`` (an HTML file of a stored partition, at ``name`` inside it) without script,
    event handlers, forms, frames, refreshes or any URL leaving the partition's folder. The
    tables GX fills from script (bootstrap-table on the index page) are written out as
    plain rows, so the page stays readable with script off."""
    text = body.decode("utf-8", errors="replace")
    parser = _Inert(name, bootstrap_tables(text))
    parser.feed(text)
    parser.close()
    return "".join(parser.out).encode()


# ---------------------------------------------------------------- GX's script-filled tables

_TABLE_CALL = re.compile(r"""\$\(\s*['"]#([A-Za-z0-9_-]+)['"]\s*\)\s*\.bootstrapTable\(""")


def _literal(text: str, start: int) -> tuple[Any, int] | None:
    """The Python literal (list/dict, as GX's templates print them with repr) that opens
    at ``text[start]``, and the index after it; None when it does not parse."""
    depth, i, quote = 0, start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth == 0:
                try:
                    return ast.literal_eval(text[start:i + 1]), i + 1
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    return None
        i += 1
    return None


def bootstrap_tables(text: str) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """``{table id: (columns, rows)}`` of every ``$('#id').bootstrapTable({columns: [...],
    data: [...]})`` call in ``text`` (GX's bootstrap_table.j2); calls that do not parse as
    that shape are left out (their table then stays empty, as it is with script off)."""
    out = {}
    for m in _TABLE_CALL.finditer(text):
        found: dict[str, Any] = {}
        pos = m.end()
        for key in ("columns", "data"):
            k = re.compile(rf"\b{key}\s*:\s*\[").search(text, pos, pos + 200_000)
            lit = _literal(text, k.end() - 1) if k else None
            if lit is None:
                break
            found[key], pos = lit
        cols, rows = found.get("columns"), found.get("data")
        if (isinstance(cols, list) and isinstance(rows, list) and all(isinstance(c, dict) for c in cols)
                and all(isinstance(r, dict) for r in rows)):
            out[m.group(1)] = (cols, rows)
    return out


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _text(value: Any) -> str:
    """The visible text of a cell GX wrote as an HTML snippet (whitespace collapsed)."""
    p = _Text()
    p.feed("" if value is None else str(value))
    p.close()
    return " ".join("".join(p.parts).split())


def _plain(row: dict[str, Any], field: str) -> Any:
    for key in (f"_{field}_text", f"_{field}_sort"):
        if isinstance(row.get(key), str):
            return row[key]
    return row.get(field)


def _rows(cols: list[dict[str, Any]], rows: list[dict[str, Any]], name: str) -> str:
    """A header and one row per record, as text: a cell shows the field's ``_<field>_text``
    (GX's plain form of an icon) or ``_<field>_sort`` (its plain value) when it is text,
    else the text of its HTML; a row's
    ``_table_row_link_path`` (a page of the same site) links its first cell."""
    fields = [str(c.get("field", "")) for c in cols]
    out = ["<thead><tr>" + "".join(f"<th>{escape(str(c.get('title', c.get('field', ''))))}</th>" for c in cols)
           + "</tr></thead><tbody>"]
    for r in rows:
        cells = [escape(_text(_plain(r, f))) for f in fields]
        link = r.get("_table_row_link_path")
        if cells and isinstance(link, str) and local_url(link, name):
            cells[0] = f'<a href="{escape(link, quote=True)}">{cells[0] or "open"}</a>'
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</tbody>"
