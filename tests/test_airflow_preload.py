"""Task processes start with torch already imported: the scheduler's LocalExecutor uses
Airflow 3.3's forkserver with ``mp_forkserver_preload`` (scripts/airflow_env.py), workers
fork from the forkserver and the task supervisor forks each task from a worker. This test
reproduces that chain with Airflow's own start-method code (no scheduler needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import json, multiprocessing, sys
from airflow.utils.process_utils import set_component_mp_start_method
set_component_mp_start_method("scheduler")  # what `airflow scheduler` does before the executor starts
from tests.test_airflow_preload import worker
q = multiprocessing.SimpleQueue()
p = multiprocessing.Process(target=worker, args=(q,))  # as LocalExecutor._spawn_worker does
p.start()
out = q.get()
p.join()
out["start_method"] = multiprocessing.get_start_method()
print("PROBE " + json.dumps(out))
"""


def task(w: int) -> None:
    """The task process: what is imported on arrival, and what importing the labelling costs."""
    before = {m: m in sys.modules for m in ("torch", "pyarrow", "kdcore")}
    t0 = time.perf_counter()
    import torch

    import kdcore.labels.materialize  # noqa: F401

    torch.set_num_threads(2)  # usable after the fork: no thread pool was started before it
    a = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096
    out = {"preloaded": before, "import_s": time.perf_counter() - t0, "matmul": float((a @ a).sum())}
    os.write(w, json.dumps(out).encode())
    os._exit(0)


def worker(q) -> None:
    """A LocalExecutor worker: forks each task like airflow.sdk's supervisor (bare fork)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        task(w)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    q.put(json.loads(data))


def test_tasks_fork_with_torch_preloaded_but_not_kdcore(tmp_path):
    from tests.airflow_helpers import airflow_env

    env = airflow_env(tmp_path / "airflow", tmp_path / "store")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1].split(" ", 1)[1])
    assert out["start_method"] == "forkserver"
    # Third-party libraries come preloaded; kdcore does not (a kdcore change must take effect
    # without restarting the scheduler).
    assert out["preloaded"] == {"torch": True, "pyarrow": True, "kdcore": False}
    a = [[i * 64 + j for j in range(64)] for i in range(64)]
    want = sum(sum(a[i][k] * a[k][j] for k in range(64)) for i in range(64) for j in range(64)) / 4096 ** 2
    assert abs(out["matmul"] - want) <= 1e-4 * want
    assert out["import_s"] < 3.0, out  # ~0.5 s of kdcore itself, vs ~4.5 s with torch
