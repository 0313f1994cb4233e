"""The KD view inside the Airflow UI (Airflow 3 plugin).

Registers one FastAPI app under ``/kd`` on the API server, two external views, and a
listener (kd_ui/run_notes.py) that notes each kd_daily run's partition in the run list:
a "KD" tab on every DAG run page (an iframe on ``/kd/run/{DAG_ID}/{RUN_ID}``) and a
"KD dashboard" entry in the navigation (``/kd/``). Every endpoint of the app requires an
Airflow token (see kd_ui/app.py: Airflow's own ``get_user`` is the app's dependency).

Kept light: this module is imported by every Airflow process that loads plugins
(scheduler, DAG processor, task runners); kdcore (torch, pyarrow) is only imported by
the request handlers, inside the API server.
"""

from __future__ import annotations

import sys
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # the plugins folder, so that `kd_ui` is importable
    sys.path.insert(0, str(_HERE.parent))

from kd_ui import run_notes  # noqa: E402
from kd_ui.app import URL_PREFIX, create_app  # noqa: E402

kd_app = create_app()


class KDUIPlugin(AirflowPlugin):
    name = "kd_ui"
    listeners = [run_notes]
    fastapi_apps = [{"app": kd_app, "url_prefix": URL_PREFIX, "name": "KD view"}]
    external_views = [
        {"name": "KD", "href": f"{URL_PREFIX}/run/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "kd_run"},
        {"name": "KD dashboard", "href": f"{URL_PREFIX}/", "destination": "nav",
         "url_route": "kd_dashboard"},
    ]
