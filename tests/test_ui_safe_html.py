"""kd_ui.safe_html.inert_html, the rewrite of stored HTML (GX Data Docs) before the plugin
serves it from the Airflow origin: markup that would run script, load from another origin,
navigate away or reach the REST API is gone, and what is left is the document's text and
tables. (The browser side, CSP included, is tests/test_ui_hostile.py.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))  # as Airflow's plugin manager does
from kd_ui.safe_html import bootstrap_tables, inert_html, local_url  # noqa: E402

NAME = "data_docs/validations/suite/run/20240301T000000Z/batch.html"


def _inert(html: str, name: str = NAME) -> str:
    return inert_html(html.encode(), name).decode()


@pytest.mark.parametrize("hostile", [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=https://cdn.example/x.js></SCRIPT>",
    "<svg><script>alert(1)</script></svg>",
    "<img src=x onerror=alert(1)>",
    "<img/src=x/onerror=alert(1)>",
    "<body onload=alert(1)>",
    "<a href='jav&#x61;script:alert(1)'>x</a>",
    "<a href=' java\tscript:alert(1)'>x</a>",
    "<iframe srcdoc='&lt;script&gt;alert(1)&lt;/script&gt;'></iframe>",
    "<object data=https://evil.example/x.swf></object>",
    "<embed src=//evil.example/x>",
    "<meta http-equiv=refresh content='0;url=https://evil.example/'>",
    "<base href=https://evil.example/>",
    "<form action=https://evil.example/><input name=q></form>",
    "<link rel=stylesheet href=https://cdn.example/bootstrap.css>",
    "<img src=//evil.example/p.png>",
    "<img src=/api/v2/dags>",
    "<img src=../../../../../../api/v2/dags>",
    "<img src=x srcset='https://evil.example/a.png 2x'>",
    "<svg><style><img src=x onerror=alert(1)></style></svg>",
    "<!--><img src=x onerror=alert(1)>-->",
    "<div x\"onmouseover=alert(1) y=1>t</div>",
])
def test_hostile_markup_is_made_inert(hostile):
    out = _inert(f"<!doctype html><html><head><title>t</title></head><body><p>before</p>{hostile}"
                 f"<p>after</p></body></html>")
    low = out.lower()
    assert "<script" not in low and "javascript:" not in low, out
    assert not re.search(r"<[a-z][^>]*\son[a-z]+\s*=", low), out  # no event handler attribute
    for tag in ("<iframe", "<object", "<embed", "<base", "<form", "<input", "<meta http-equiv"):
        assert tag not in low, (tag, out)
    assert "evil.example" not in low and "cdn.example" not in low, out
    assert "/api/v2" not in low, out
    assert "<p>before</p>" in out and "<p>after</p>" in out, out


def test_readable_markup_and_local_links_are_kept():
    html = ("<!DOCTYPE html><html><head><meta charset=\"UTF-8\"><style>td > b { color: red }</style>"
            "<link rel=\"shortcut icon\" href=\"../../../static/images/favicon.ico\"/></head><body>"
            "<a href=\"../../../../index.html\">Home</a> <a href=\"#section-1\">s1</a>"
            "<table class=\"table\"><tr><th>column</th></tr><tr><td>a &lt;b&gt; &amp; c</td></tr></table>"
            "<svg viewBox=\"0 0 1 1\"><path d=\"M0 0\"/></svg>"
            "<i class=\"fas fa-check-circle text-success\" aria-hidden=\"true\"></i></body></html>")
    out = _inert(html)
    assert out.startswith("<!DOCTYPE html>")
    assert '<meta charset="UTF-8">' in out and "td > b { color: red }" in out
    assert 'href="../../../static/images/favicon.ico"' in out and 'href="../../../../index.html"' in out
    assert '<a href="#section-1">s1</a>' in out
    assert "<td>a &lt;b&gt; &amp; c</td>" in out  # text stays text
    assert '<path d="M0 0" />' in out
    assert "\u2714</span></i>" in out  # GX's status icon (a CDN font) as a glyph


@pytest.mark.parametrize(("url", "ok"), [
    ("index.html", True), ("#x", True), ("", True), ("../../../../index.html", True),
    ("../../../../../decision.json", True), ("../../../../../../x", False),  # out of the partition
    ("/kd/artifacts/quality/2024-03-01/decision.json", False), ("//evil.example/", False),
    ("https://cdn.example/x.js", False), ("data:text/html,<script>", False), ("javascript:alert(1)", False),
    ("\\\\evil.example\\x", False), (" j\na\tvascript:alert(1)", False),
])
def test_local_url(url, ok):
    assert local_url(url, NAME) is ok


def test_script_filled_index_tables_are_written_as_rows():
    """GX's index page is empty tables that bootstrap-table fills from a <script>: served
    without script, the rows are written out (text only; links within the site kept)."""
    html = """<html><body><table
  id="section-1-body-table"
  data-toggle="table"
>
</table>
<script>
  $('#section-1-body-table').bootstrapTable(
    Object.assign(
      {
        columns: [{'field': 'validation_success', 'title': 'Status'}, {'field': 'run_name', 'title': 'Run Name'},
                  {'field': 'asset_name', 'title': 'Asset <Name>'}],
        data: [{'validation_success': '<span><i class="fas fa-check"></i></span>', '_validation_success_text': 'Failed',
                'run_name': "shop-2024-03-01 <img src=x onerror=alert(1)>", 'asset_name': '<b>shop</b>',
                '_table_row_link_path': 'validations/s/r/t/b.html'},
               {'validation_success': 'x', 'run_name': 'r2', 'asset_name': 'a',
                '_table_row_link_path': 'https://evil.example/'}],
        toolbar: '#section-1-body-table-toolbar'
      },
      {'search': 'true'}
    )
  );
</script></body></html>"""
    assert list(bootstrap_tables(html)) == ["section-1-body-table"]
    out = _inert(html, "data_docs/index.html")
    assert "<script" not in out.lower() and "onerror" not in out
    assert "<thead><tr><th>Status</th><th>Run Name</th><th>Asset &lt;Name&gt;</th></tr></thead>" in out
    assert ('<tr><td><a href="validations/s/r/t/b.html">Failed</a></td><td>shop-2024-03-01</td>'
            "<td>shop</td></tr>") in out
    assert "<tr><td>x</td><td>r2</td><td>a</td></tr>" in out  # a link leaving the site is not written
    assert "evil.example" not in out


def test_unparsable_table_script_leaves_the_table_empty():
    html = "<table id='t'></table><script>$('#t').bootstrapTable({columns: [{'field': f()}], data: []})</script>"
    assert bootstrap_tables(html) == {}
    assert _inert(html) == "<table id=\"t\"></table>"
