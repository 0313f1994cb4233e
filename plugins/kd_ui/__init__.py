"""KD view for the Airflow UI: a FastAPI app (kd_ui.app) over the pipeline's storage root
(kd_ui.data), with server-rendered HTML pages (kd_ui.pages). The Airflow plugin that
mounts it is kd_ui_plugin.py."""
