"""No stored script runs in the Airflow origin (issue 19, item 3), shown with a hostile dataset
through the real pipeline and a real browser.

The dataset (a spec and a CSV written here, published with ``kd data ingest``) has HTML and
script in two column names and in the values of a categorical column; the tiny models are
bootstrapped on it and two days run (``kd run``), so the gate publishes GX Data Docs that
print those names and values unescaped (checked: the stored pages hold the raw payloads), and
check details that name them. A kd_daily run of the last day carries a hostile note. An API
server on the Airflow home of tests/test_ui_plugin.py's fixture (same users, same DAG runs)
serves this storage root; headless Chromium logs in, opens the run's KD tab, follows a Data
Docs link inside it, the dashboard, every Data Docs page of both days, the report and JSON.

Every payload, had it run, would set ``window.__kd_pwned``, call ``fetch('/api/v2/dags?kd_pwned=...')``
and ``alert()``. Asserted: no frame of any page has ``__kd_pwned``; no request names
``kd_pwned``; no request from a KD frame goes anywhere but the KD view itself, and none at
all leaves the loopback host; no dialog opened; every KD document came with its CSP (the
sandbox on Data Docs, whose frames have the opaque origin ``null``) and nosniff; the hostile
text is shown as text on the KD pages. Student names cannot carry markup: the config and
the DAG's params refuse them (asserted too).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.airflow_helpers import DAG_ID, airflow_env, free_port, running, wait_until
from tests.pipeline_fixtures import kd_base  # noqa: F401
from tests.test_ui_browser import browser, login  # noqa: F401
from tests.test_ui_plugin import (  # noqa: F401
    PREFIX,
    Server,
    _health,
    api_server,
    assert_artifact_policy,
    assert_page_policy,
    kd_ui_server,
)

pytestmark = pytest.mark.integration


def js(where: str) -> str:
    """What each payload would run (no spaces: it fits an unquoted attribute)."""
    return f"window.__kd_pwned='{where}',fetch('/api/v2/dags?kd_pwned={where}'),alert('{where}')"


COL_SCRIPT = f"<script>{js('column')}</script>"  # a categorical feature
COL_IMG = f"<img src=x onerror={js('column-img')}>"  # a numeric feature
VALUES = [f"'\"><img src=x onerror={js('value')}>", f"<script>{js('value-script')}</script>", "plain"]
NEW_VALUE = f"<svg onload={js('new-value')}>"  # last day only: an unexpected value, listed in the Data Docs
NOTE = (f"<script>{js('note')}</script> <img src=x onerror={js('note-img')}> "
        f"[click](javascript:{js('note-link')})")
STUDENT = f"<img src=x onerror={js('student')}>"
DAYS = [dt.date(2024, 3, 1) + dt.timedelta(days=i) for i in range(5)]  # 3 bootstrap days, then 2 daily runs
ROWS_PER_DAY = 80
LOOPBACK = {"127.0.0.1", "localhost"}

CONFIG = """\
dataset: {spec}
storage_root: {store}
teacher:
  name: teacher
  model: {{embedding_dim: 8, hidden: [16], hash_buckets: 512, lr: 0.01, batch_size: 64, epochs: 1}}
students:
  - name: {student}
    model: {{embedding_dim: 4, hidden: [8], hash_buckets: 256, lr: 0.01, batch_size: 64, epochs: 1}}
    distill: {{mode: auxiliary}}
labels: {{shards: 1, batch_rows: 200}}
bootstrap: {{days: 3, epochs: 1}}
torch_threads: 1
gate:
  ignore_features: [user, item]
"""


@dataclass
class Hostile:
    store: Path
    config: Path
    spec: Path
    tmp: Path


def _write_source(tmp: Path) -> tuple[Path, Path]:
    """The spec (JSON, which is YAML) and a CSV of 5 days x 80 rows with hostile names and values."""
    spec = {"name": "hostile", "example_id": "id", "timestamp": "ts", "group": "user",
            "categorical": ["user", "item", COL_SCRIPT], "numeric": [COL_IMG],
            "tasks": [{"name": "click", "kind": "binary"}]}
    spec_path = tmp / "hostile_spec.yaml"
    spec_path.write_text(json.dumps(spec, indent=1))
    rng = random.Random(19)
    src = tmp / "events.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "ts", "user", "item", COL_SCRIPT, COL_IMG, "click"])
        for d, day in enumerate(DAYS):
            last = day == DAYS[-1]
            for k in range(ROWS_PER_DAY):
                value = NEW_VALUE if last and k % 4 == 0 else VALUES[rng.randrange(len(VALUES))]
                w.writerow([d * ROWS_PER_DAY + k, f"{day.isoformat()}T{k % 24:02d}:{k % 60:02d}:00Z",
                            f"u{rng.randrange(12)}", f"i{rng.randrange(30)}", value,
                            round(rng.random() * (9 if last else 1), 4), int(rng.random() < 0.3)])
    return spec_path, src


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Hostile:
    """The hostile dataset through the real pipeline: ingest, bootstrap, two daily runs (+ report)."""
    from kdcore.cli import main

    tmp = tmp_path_factory.mktemp("kd-hostile")
    store = tmp / "store"
    spec, src = _write_source(tmp)
    config = tmp / "hostile.yaml"
    config.write_text(CONFIG.format(spec=spec, store=store, student="student_aux"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("KD_STORAGE_ROOT", raising=False)  # the config's storage_root
        assert main(["data", "ingest", "--spec", str(spec), "--source", str(src), "--root", str(store)]) == 0
        assert main(["bootstrap", "--config", str(config), "--through", DAYS[2].isoformat()]) == 0
        assert main(["run", "--config", str(config), "--from", DAYS[3].isoformat(), "--to", DAYS[-1].isoformat(),
                     "--quiet"]) == 0
    return Hostile(store=store, config=config, spec=spec, tmp=tmp)


@pytest.fixture(scope="module")
def hostile_server(kd_ui_server, hostile) -> Server:  # noqa: F811
    """A second API server on kd_ui_server's Airflow home, over the hostile root; a kd_daily
    run of the last hostile day with a hostile note."""
    logdir = hostile.tmp / "logs"
    logdir.mkdir()
    comp, api = api_server(airflow_env(kd_ui_server.home, hostile.store, hostile.config, api_port=free_port()),
                           logdir)
    with running([comp]):
        wait_until("hostile API server health", lambda: _health(api), 120, components=[comp])
        api.login()
        run = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"date": DAYS[-1].isoformat()}})
        api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}?update_mask=note", {"note": NOTE})
        yield Server(api=api, home=kd_ui_server.home, store=hostile.store, days=DAYS[3:], run_id=run["dag_run_id"],
                     report={}, comps=[comp])


def test_hostile_data_docs_are_stored_raw(hostile_server):
    """The premise: GX printed the hostile column names and an unexpected value as markup
    into the stored pages (so only how they are served keeps them from running)."""
    from kdcore.storage import partition as part

    s = hostile_server
    for day in s.days:
        uri = s.store.as_uri() + f"/quality/hostile/date={day.isoformat()}"
        pages = {p: part.read_blob(uri, p).decode() for p in s.json(f"{PREFIX}/api/day/{day}")["gate"]["data_docs"]}
        validation = next(html for p, html in pages.items() if "/validations/" in p)
        assert COL_SCRIPT in validation and COL_IMG in validation, day
    assert NEW_VALUE in validation  # the last day's unexpected value (GX escapes the value set, not these)


def test_student_names_cannot_carry_markup(hostile, kd_ui_server, capsys):  # noqa: F811
    """Names become paths, asset names and page text: the config refuses markup in them
    (exit 2, naming the file and the field), and so do the DAG's params."""
    from kdcore.cli import main

    bad = hostile.tmp / "bad_student.yaml"
    bad.write_text(CONFIG.format(spec=hostile.spec, store=hostile.tmp / "bad-store", student=json.dumps(STUDENT)))
    assert main(["run", "--config", str(bad), "--from", DAYS[3].isoformat(), "--to", DAYS[3].isoformat()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kd: error: {bad}: ") and "field 'students.0.name'" in err, err
    assert not (hostile.tmp / "bad-store").exists()
    api = kd_ui_server.api
    with pytest.raises(AssertionError, match=r"-> 400"):
        api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None,
                                                 "conf": {"date": DAYS[3].isoformat(), "students": [STUDENT]}})


def test_no_script_runs_and_no_request_leaves_the_page(hostile_server, browser, tmp_path):  # noqa: F811
    s = hostile_server
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    requests: list[tuple[str, str]] = []  # (url, url of the frame that made it), but the test's own page.goto
    documents: list[tuple[str, int, dict[str, str]]] = []
    dialogs: list[str] = []
    ctx.on("request", lambda r: None if _top_navigation(r) else requests.append((r.url, _frame_url(r))))
    ctx.on("response", lambda r: documents.append((r.url, r.status, r.all_headers()))
           if r.request.resource_type == "document" else None)
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    frames_seen: list[str] = []
    docs_urls: list[str] = []

    def no_script_ran() -> None:
        for f in page.frames:
            if f.url.startswith(("about:", "chrome-error:")):
                continue
            frames_seen.append(f.url)
            pwned, origin = f.evaluate("() => [typeof window.__kd_pwned, window.origin]")
            assert pwned == "undefined", (f.url, pwned)
            if urlsplit(f.url).path.startswith(f"{PREFIX}/artifacts/"):
                assert origin == "null", (f.url, origin)  # the sandbox: an opaque origin

    try:
        login(page, s)
        # -- the run's KD tab; its note is hostile
        page.goto(f"{s.base}/dags/{DAG_ID}/runs/{s.run_id}/plugin/kd_run")
        tab = page.frame_locator("iframe[title='KD']")
        tab.locator("#checks").wait_for()
        day = s.days[-1].isoformat()
        assert tab.locator("[data-kd='date']").inner_text() == day
        checks = tab.locator("#checks").inner_text()
        assert COL_IMG in checks and COL_SCRIPT in checks, checks  # shown as text: escaped
        assert f"expect_column_values_to_be_in_set({COL_SCRIPT})" in checks, checks
        page.screenshot(path=str(tmp_path / "hostile_run_tab.png"), full_page=True)
        no_script_ran()
        # -- a Data Docs page opened from the tab: the sandboxed page inside the UI's iframe
        with page.expect_event("framenavigated", lambda f: "/validations/" in f.url) as nav:
            tab.locator("a[href*='/validations/']").first.click()
        docs_frame = nav.value
        docs_frame.wait_for_load_state()
        assert "Great Expectations" in docs_frame.title() or docs_frame.locator("table").count() > 3
        no_script_ran()

        # -- the dashboard in the UI
        page.goto(f"{s.base}/plugin/kd_dashboard")
        dash = page.frame_locator("iframe[title='KD dashboard']")
        dash.locator("#gates").wait_for()
        assert dash.locator(f"[data-kd='gate:{day}:status']").inner_text() in ("pass", "warn", "fail")
        no_script_ran()

        # -- every Data Docs page of both days, the report and the JSON, at top level
        for d in s.days:
            page.goto(f"{s.base}{PREFIX}/day/{d.isoformat()}")
            page.locator("#docs").wait_for()
            no_script_ran()
            for name in s.json(f"{PREFIX}/api/day/{d.isoformat()}")["gate"]["data_docs"]:
                docs_urls.append(f"{s.base}{PREFIX}/artifacts/quality/{d.isoformat()}/{name}")
                r = page.goto(docs_urls[-1])
                assert r.status == 200 and r.headers["content-type"].startswith("text/html"), (name, r.status)
                assert page.locator("table").count() > 0, name  # still tables without script
                no_script_ran()
                if "/validations/" in name and d == s.days[-1]:
                    page.screenshot(path=str(tmp_path / "hostile_validation.png"), full_page=True)
        for path in (f"{PREFIX}/artifacts/report/report.md", f"{PREFIX}/api/day/{day}"):
            r = page.goto(f"{s.base}{path}")
            assert r.status == 200 and r.headers["x-content-type-options"] == "nosniff", path
            no_script_ran()
        page.wait_for_timeout(500)  # an onerror or fetch that somehow ran would have fired by now
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"failure screenshot: {tmp_path / 'failure.png'}; url {page.url}")
        raise
    finally:
        ctx.close()

    assert dialogs == [], dialogs
    assert not [u for u, _ in requests if "kd_pwned" in u], requests
    assert not [u for u, _ in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                and urlsplit(u).hostname not in LOOPBACK], requests
    from_kd = [(u, f) for u, f in requests if urlsplit(f).path.startswith(f"{PREFIX}/")]
    assert from_kd, requests
    assert not [(u, f) for u, f in from_kd if not urlsplit(u).path.startswith(f"{PREFIX}/")], from_kd
    kd_docs = [(u, st, h) for u, st, h in documents if urlsplit(u).path.startswith(f"{PREFIX}/")]
    assert len(kd_docs) >= 10, [u for u, _, _ in kd_docs]
    for url, status, headers in kd_docs:
        assert status == 200 and headers.get("x-content-type-options") == "nosniff", (url, status)
        if urlsplit(url).path.startswith(f"{PREFIX}/artifacts/"):
            assert_artifact_policy(headers)
        else:
            assert_page_policy(headers)
    assert len(docs_urls) == 3 * len(s.days) and set(docs_urls) <= set(frames_seen), (docs_urls, frames_seen)


def _top_navigation(request) -> bool:
    """A navigation of a page's main frame: the test's own page.goto (or a click there)."""
    try:
        return request.is_navigation_request() and request.frame.parent_frame is None
    except Exception:  # noqa: BLE001 - a request of no frame (service worker)
        return False


def _frame_url(request) -> str:
    try:
        return request.frame.url
    except Exception:  # noqa: BLE001 - a request of no frame (service worker)
        return ""
