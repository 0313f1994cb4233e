"""The KD view's FastAPI app, mounted by the plugin at URL_PREFIX on Airflow's API server.

Authentication: FastAPI apps registered by a plugin are not behind Airflow's auth, so the
app declares Airflow's own credential check as a dependency of every route:
``airflow.api_fastapi.core_api.security.get_user`` (the dependency of the core REST API)
validates ``Authorization: Bearer <JWT from /auth/token>`` or, for the UI's iframes,
the ``_token`` session cookie, with the configured auth manager. A missing, expired or
invalid token is a 401 (Airflow answers an undecodable token with 403; the view maps it
to 401 with ``WWW-Authenticate: Bearer`` so "not authenticated" has one status).

Routes (all GET):
  /                          HTML dashboard over dates (nav view)
  /run/{dag_id}/{run_id}     HTML view of one DAG run's partition date (dag_run tab)
  /day/{date}                HTML view of one date
  /api/dashboard             JSON of the dashboard
  /api/run/{dag_id}/{run_id} JSON of a run's date view (with dag_id, run_id)
  /api/day/{date}            JSON of one date
  /api/lineage               JSON: which teacher labelled which date, who consumed it
  /artifacts/report/{name}   a file of the published report (plots, CSV, report.md)
  /artifacts/quality/{date}/{name:path}  a file of a date's gate record (Data Docs, JSON)

Script: every response carries ``X-Content-Type-Options: nosniff`` and a
Content-Security-Policy (kd_ui.safe_html): the view's pages PAGE_CSP (no script, framed by
the Airflow UI only), stored artifacts ARTIFACT_CSP (``sandbox``, nothing loaded), and
stored HTML is served through ``safe_html.inert_html`` (no script, no other origin).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kd_ui import data, pages
from kd_ui.safe_html import ARTIFACT_CSP, HTML_TYPES, NOSNIFF, PAGE_CSP, inert_html

URL_PREFIX = "/kd"
_bearer = HTTPBearer(auto_error=False)


async def require_airflow_user(request: Request,
                               bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Any:
    """Airflow's get_user (bearer token first, then the UI's `_token` cookie)."""
    from airflow.api_fastapi.core_api.security import get_user

    try:
        return await get_user(request, None, bearer)
    except HTTPException as e:
        if e.status_code in (401, 403):
            raise HTTPException(status_code=401, detail=f"Not authenticated: {e.detail}",
                                headers={"WWW-Authenticate": "Bearer"}) from None
        raise


def _call(fn, *args):
    try:
        return fn(*args)
    except data.NotFound as e:
        raise HTTPException(status_code=404, detail=str(e)) from None


def create_app() -> FastAPI:
    app = FastAPI(title="KD view", description="Knowledge-distillation figures from the pipeline's storage root",
                  dependencies=[Depends(require_airflow_user)],
                  # FastAPI's generated docs would be public routes: none are served
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        """Every response, errors included: not sniffed, and the view's policy unless the
        route set the artifacts' one."""
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers.update(NOSNIFF)
        return response

    @app.get("/", response_class=HTMLResponse)
    def dashboard_page(request: Request) -> HTMLResponse:
        return HTMLResponse(pages.dashboard(_call(data.dashboard), _base(request)))

    @app.get("/run/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_page(dag_id: str, run_id: str, request: Request, date: str | None = None) -> HTMLResponse:
        view = _run_view(dag_id, run_id, date)
        return HTMLResponse(pages.day(view, _base(request)))

    @app.get("/day/{date}", response_class=HTMLResponse)
    def day_page(date: str, request: Request) -> HTMLResponse:
        return HTMLResponse(pages.day(_call(data.day_view, _call(data.parse_day, date)), _base(request)))

    @app.get("/api/dashboard")
    def dashboard_json() -> JSONResponse:
        return JSONResponse(_call(data.dashboard))

    @app.get("/api/run/{dag_id}/{run_id}")
    def run_json(dag_id: str, run_id: str, date: str | None = None) -> JSONResponse:
        return JSONResponse(_run_view(dag_id, run_id, date))

    @app.get("/api/day/{date}")
    def day_json(date: str) -> JSONResponse:
        return JSONResponse(_call(data.day_view, _call(data.parse_day, date)))

    @app.get("/api/lineage")
    def lineage_json() -> JSONResponse:
        return JSONResponse(_call(data.lineage))

    @app.get("/artifacts/report/{name}")
    def report_artifact(name: str) -> Response:
        return _artifact(name, *_call(data.report_artifact, name))

    @app.get("/artifacts/quality/{date}/{name:path}")
    def quality_artifact(date: str, name: str) -> Response:
        return _artifact(name, *_call(data.quality_artifact, _call(data.parse_day, date), name))

    return app


def _artifact(name: str, body: bytes, kind: str) -> Response:
    """A stored file as data, not as a page of this origin: sandboxed whatever its type
    (HTML, SVG, a type the browser would guess), HTML rewritten without script."""
    if kind in HTML_TYPES:
        body = inert_html(body, name)
    return Response(body, media_type=kind, headers={"Content-Security-Policy": ARTIFACT_CSP})


def _run_view(dag_id: str, run_id: str, date: str | None) -> dict[str, Any]:
    """A run's date view. ``?date=`` overrides the date resolved from the run (for runs that
    name none); the run must exist either way."""
    day = _call(data.run_date, dag_id, run_id) if date is None else _call(data.parse_day, date)
    if date is not None:
        _call(_exists, dag_id, run_id)
    view = _call(data.day_view, day)
    return {"dag_id": dag_id, "run_id": run_id, **view}


def _exists(dag_id: str, run_id: str) -> None:
    try:
        data.run_date(dag_id, run_id)
    except data.NotFound as e:
        if str(e).startswith("no run "):
            raise


def _base(request: Request) -> str:
    """The app's mount path as the browser sees it (links stay inside the app)."""
    return request.scope.get("root_path", "").rstrip("/") or URL_PREFIX
