"""The orchestration: the daily stages as one graph (:mod:`kdcore.flow.graph`) that
``kd run``, ``kd student train`` and the Airflow tasks all walk. Light to import (no
torch, no pyarrow at module level): the DAG file reads the stage list from here."""
