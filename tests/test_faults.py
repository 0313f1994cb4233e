"""Fault injection against the whole pipeline: SIGKILL at random points of a daily run, a
tiny full file system, random bit flips in every kind of stored file. Network faults
(a proxy in front of the GCS emulator) are in tests/test_faults_gcs.py.

What must hold: a killed run resumed gives the same bytes as an uninterrupted one and
leaves nothing ``vacuum`` cannot reach; a full disk is one clear error and no debris; a
flipped bit anywhere is refused by name on read."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import json
import os
import random
import re
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kdcore.errors import StorageError
from kdcore.storage import partition as part
from kdcore.storage.manifest import MANIFEST_NAME
from tests.pipeline_fixtures import KD, TINY, copy_root, kd, kd_base, tree_digest  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "KD_STORAGE_ROOT": str(root), **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def _kd(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcore.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def _outputs(root: Path) -> dict[str, object]:
    """Every published byte, except two records of wall time: the gate's Data Docs carry
    GX run ids and times (the gate keeps the first copy it published), and a checkpoint's
    meta.json records ``train_seconds`` (so its manifest differs too). Those metas are
    compared without that one field; weights, optimizer state and labels byte for byte."""
    out: dict[str, object] = {}
    for k, v in tree_digest(root).items():
        if k.startswith("quality/") or (k.startswith("models/") and k.endswith(MANIFEST_NAME)):
            continue
        if k.startswith("models/") and Path(k).name.startswith("meta-"):
            meta = json.loads((root / k).read_text())
            meta.pop("train_seconds")
            out[str(Path(k).parent / "meta.json")] = meta
        else:
            out[k] = v
    return out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _kill_after_new_files(args: list[str], env: dict[str, str], root: Path, k: int, timeout: float = 600) -> bool:
    """Start ``kd ARGS`` and SIGKILL it once ``k`` new files (temp files included) have
    appeared under ``root``: the kill point follows the run's progress, not a clock.
    True when it was killed (False: it finished first)."""
    before = _files(root)
    proc = subprocess.Popen([sys.executable, "-m", "kdcore.cli", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if len(_files(root) - before) >= k:
                proc.kill()
                proc.wait()
                return True
            if time.monotonic() > deadline:
                pytest.fail(f"kd {' '.join(args)} made fewer than {k} files in {timeout} s")
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_run_killed_at_random_points_resumes_to_the_same_bytes(kd: KD, kd_base, tmp_path):
    D = kd.day(1).isoformat()
    args = ["run", "--config", str(TINY), "--from", D, "--to", D, "--quiet"]
    reference = copy_root(kd_base, tmp_path / "reference")
    done = _kd(args, _env(reference))
    assert done.returncode == 0, done.stderr
    made = len(_files(reference) - _files(kd.root))
    assert made > 20

    env = _env(kd.root)
    rng = random.Random(2024)
    points = sorted(rng.sample(range(1, made), 3))  # three kill points spread over the run
    killed = [_kill_after_new_files(args, env, kd.root, k - (0 if i == 0 else points[i - 1]))
              for i, k in enumerate(points)]
    assert killed[0], "the first kill point comes before the run can finish"
    resumed = _kd(args, env)
    assert resumed.returncode == 0, resumed.stderr
    # The killed runs' leftovers predate the whole resumed run (--older-than must be positive).
    assert _kd(["vacuum", "--root", str(kd.root), "--older-than", "0.001"], env).returncode == 0
    assert _outputs(kd.root) == _outputs(reference)
    assert not [f for f in _files(kd.root) if "/.tmp-" in f]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB file system (tmpfs, mounted by the test; this suite runs as root in CI).
    Where mounting is not allowed, a 1 MiB file-size limit plays the full disk."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        yield mnt, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _limit_file_size():  # runs in the child before exec: the fallback "full disk"
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.parametrize("spool_on_tiny", [False, True], ids=["root-full", "spool-full"])
def test_a_full_disk_is_one_clear_error_and_leaves_no_debris(tiny_fs, tmp_path, spool_on_tiny):
    mnt, mounted = tiny_fs
    root = mnt / "root"
    spool = mnt / "tmp" if spool_on_tiny else tmp_path / "spool"
    spool.mkdir()
    env = _env(root, TMPDIR=str(spool))
    args = [sys.executable, "-m", "kdcore.cli", "data", "synth", "--root", str(root), "--from", "2026-01-01",
            "--to", "2026-01-02", "--rows-per-day", "60000"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          preexec_fn=None if mounted else _limit_file_size)
    assert proc.returncode == 2, proc.stderr
    print(proc.stderr.strip().splitlines()[-1])
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    reason = "no space left on device" if mounted else "file too large"
    assert last.startswith("kd: error: ") and "nothing was published" in last and (
        reason in last.lower() or (spool_on_tiny and "cannot spool" in last)), last
    if spool_on_tiny:
        assert "cannot spool the partition" in last
    published = part.list_partitions(str(root / "examples" / "synth"))
    # only whole days are visible (the first may have fitted), and every stored file belongs to one
    assert published in ([], ["2026-01-01"])
    listed = {f"root/examples/synth/date={d}/{e.path}" for d in published
              for e in part.read_manifest(str(root / "examples" / "synth" / f"date={d}")).files}
    listed |= {f"root/examples/synth/date={d}/{MANIFEST_NAME}" for d in published}
    assert _files(mnt) == listed, _files(mnt) - listed
    # nothing half-written: no temp files, no spool, no visible partition of a failed day
    assert not [f for f in _files(mnt) if "/.tmp-" in f or f.startswith("tmp/")]
    assert "2026-01-02" not in part.list_partitions(str(root / "examples" / "synth"))


def test_random_bit_flips_are_always_refused_by_name(kd: KD):
    """Flip one random bit in one random stored file (examples, checkpoints, labels,
    manifests), read what holds it: always a StorageError naming the file; restore."""
    from kdcore import pipeline

    pipeline.run_day(kd.cfg, kd.day(1), stages=("teacher", "labels"))
    root = kd.root
    rng = random.Random(5)
    files = sorted(f for f in _files(root) if not f.startswith("quality/"))
    partitions = sorted({str(Path(f).parent) for f in files if f.endswith(MANIFEST_NAME)})
    tried = 0
    for _ in range(40):
        rel = rng.choice(files)
        owner = max((p for p in partitions if rel.startswith(p + "/")), key=len, default=None)
        if owner is None:
            continue
        path = root / rel
        original = path.read_bytes()
        data = bytearray(original)
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            uri = str(root / owner)
            with pytest.raises(StorageError) as err:
                m = part.read_manifest(uri)
                for e in m.files:
                    part.read_blob(uri, e.name, m) if m.kind == "blobs" else part.read_table(uri, manifest=m)
            assert Path(rel).name in str(err.value) or MANIFEST_NAME in str(err.value), (rel, str(err.value))
            tried += 1
        finally:
            path.write_bytes(original)
    assert tried >= 30


def test_a_manifest_with_a_plausible_flip_is_refused(tmp_path):
    """A flip that keeps the JSON valid (a row count) is caught by the manifest's own checksum."""
    uri = str(tmp_path / f"t-{uuid.uuid4().hex}" / "date=2024-01-01")
    import pyarrow as pa

    part.publish_table(uri, pa.table({"id": pa.array(range(12), pa.int64())}))
    path = Path(uri) / MANIFEST_NAME
    text = path.read_text()
    assert '"rows": 12' in text
    path.write_text(text.replace('"rows": 12', '"rows": 13', 1))
    with pytest.raises(StorageError, match="corrupt manifest.*checksum does not match"):
        part.read_manifest(uri)


# The kd command line as `python -m kdcore.cli` runs it, with the INFO log the Airflow tasks
# keep (the command line itself logs nothing), so a test can follow a trainer's progress.
LOGGED_KD = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); "
             "from kdcore.cli import main; sys.exit(main())")


class _Trainer:
    """A `kd` process whose log lines the test waits on (a reader thread drains stderr)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        import queue
        import threading

        self.proc = subprocess.Popen([sys.executable, "-c", LOGGED_KD, *args], env=env, cwd=str(REPO), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                self._new.put(line)
            self._new.put(None)

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 600) -> None:
        """Until a log line contains ``text`` (the timeout only guards against a hang)."""
        import queue

        while True:
            try:
                line = self._new.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no log line with {text!r} in {timeout} s:\n{''.join(self.lines)}")
            if line is None:
                pytest.fail(f"exited ({self.proc.wait()}) before logging {text!r}:\n{''.join(self.lines)}")
            if text in line:
                return

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._reader.join(timeout)
        return self.proc.returncode, out, "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _racer_config(tmp: Path) -> Path:
    """tiny.yaml plus a student 'racer' that has no checkpoint yet (it cold-starts on the
    day) and trains for a few seconds (batch 8, 20 epochs), so a trainer stopped at its
    first training log line is stopped well before it can commit."""
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["dataset"] = str(REPO / "configs" / "movielens.yaml")
    model = {**raw["students"][0]["model"], "batch_size": 8, "epochs": 20}
    raw["students"].append({"name": "racer", "model": model, "distill": {"mode": "direct"}})
    path = tmp / "racer.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_two_racing_trainers_one_wins_the_other_conflicts_and_nothing_is_lost(kd: KD, tmp_path):
    """Two `kd student train` of the same model and day, with different inputs (distill vs
    hard labels only), both started before either commits: exactly one exits 0, the other
    exits 2 with a ConflictError line, and the stored checkpoint is the winner's. (Each
    used to read the generation when it published, so the later one silently replaced the
    earlier one's checkpoint, both exiting 0.)

    Both must have read the checkpoint's generation before either commits: the first is
    stopped (SIGSTOP) at its log line that training began, the second is started and waited
    for to the same line, then the first continues. Progress, not a clock, orders them."""
    import signal

    from kdcore.labels import materialize as mat
    from kdcore.models import registry

    D = kd.day(1)
    mat.materialize(kd.cfg, D)  # the labels both read (the same teacher and day)
    config = _racer_config(tmp_path)
    # The default retries stay on: a ConflictError is not transient, so the loser is not
    # retried (a re-run would replace the winner's checkpoint).
    env = _env(kd.root)
    uri = registry.checkpoint_uri(kd.cfg.root, "movielens", "racer", D)
    started = f"racer {D}: training racer"

    def train(action: str) -> _Trainer:
        return _Trainer(["student", "train", "--config", str(config), "--name", "racer", "--date", D.isoformat(),
                         "--action", action], env)

    first = train("distill")
    second = None
    try:
        first.wait_for(started)
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            assert not part.is_published(uri), "the first trainer committed before it was stopped"
            second = train("hard_labels_only")
            second.wait_for(started)  # past its generation read, with nothing committed yet
            assert not part.is_published(uri)
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        results = {"distill": first.finish(), "hard_labels_only": second.finish()}
    finally:
        for t in (first, second):
            if t is not None:
                t.stop()

    codes = sorted(rc for rc, _, _ in results.values())
    assert codes == [0, 2], {a: (rc, err[-2000:]) for a, (rc, _, err) in results.items()}
    (won, (_, out, _)), = [(a, r) for a, r in results.items() if r[0] == 0]
    (_, _, err), = [r for r in results.values() if r[0] == 2]
    errors = [line for line in err.splitlines() if line.startswith("kd: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"kd: error: \S+/models/movielens/racer/date=" + D.isoformat() + r": another writer "
                        r"published different content while this one ran \(manifest generation None -> \S+\); "
                        r"re-run to build on it", errors[0]), errors[0]
    winner = json.loads(out)
    kept = registry.find_checkpoint(kd.cfg.root, "movielens", "racer", D)
    assert kept.version == winner["version"] and kept.meta["gate_action"] == won
    assert kept.meta["kd_applied"] is (won == "distill")
    kept.load(kd.cfg.spec)  # every file of the winner's checkpoint is there and verified
