"""Checkpoints in object storage and their lineage.

A checkpoint trained through date D lives at ``<root>/models/<dataset>/<name>/date=D/``
(safetensors weights, safetensors optimizer state + ``meta.json``, published atomically;
never pickle). The optimizer state makes training continuous: day D+1 resumes day D's
Adam moments and learning-rate schedule, exactly as if it had never stopped. Lineage is explicit:
each meta names its parent's version, so a chain can be walked and verified no matter in
which order Airflow ran the days."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from kdcore.data.examples import parse_date
from kdcore.data.spec import DatasetSpec
from kdcore.errors import LineageError, StorageError
from kdcore.models.checkpoint import model_from_bytes, model_to_bytes
from kdcore.models.features import FeatureSet
from kdcore.models.optim import load_optimizer_state, optimizer_state_to_bytes
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, export_serving, make_optimizer
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part

WEIGHTS = "model.safetensors"
SERVING = "serving.safetensors"
OPTIMIZER = "optimizer.safetensors"
META = "meta.json"


def model_root(root: str, dataset: str, name: str) -> str:
    return sfs.join(sfs.normalize(root), "models", dataset, name)


def checkpoint_path(dataset: str, name: str, day: dt.date | str) -> str:
    """Where a checkpoint lives relative to the storage root (what metadata records)."""
    return f"models/{dataset}/{name}/date={parse_date(day).isoformat()}"


def checkpoint_uri(root: str, dataset: str, name: str, day: dt.date | str) -> str:
    return sfs.join(sfs.normalize(root), checkpoint_path(dataset, name, day))


def list_checkpoints(root: str, dataset: str, name: str) -> list[dt.date]:
    return [dt.date.fromisoformat(d) for d in part.list_partitions(model_root(root, dataset, name))]


def latest_before(root: str, dataset: str, name: str, day: dt.date, inclusive: bool = False) -> dt.date | None:
    """Newest checkpoint trained through a date before ``day`` (or on it, if inclusive)."""
    days = [d for d in list_checkpoints(root, dataset, name) if d < day or (inclusive and d == day)]
    return max(days) if days else None


@dataclass
class Checkpoint:
    uri: str
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def trained_through(self) -> dt.date:
        return dt.date.fromisoformat(self.meta["trained_through"])

    @property
    def steps(self) -> int:
        """Optimizer steps over the model's whole life (drives the learning-rate policy)."""
        return int(self.meta.get("steps_total", 0))

    def load(self, spec: DatasetSpec) -> MultiTaskRanker:
        data = part.read_blob(self.uri, WEIGHTS)
        try:
            cfg = RankerConfig.model_validate(self.meta["model"])
            cols = FeatureSet.of(spec, cfg.features)
            aux = self.meta.get("aux_tasks")
            return model_from_bytes(data, cfg, len(cols.categorical), len(cols.numeric), list(spec.tasks),
                                    aux_heads=aux if aux is not None else bool(self.meta.get("aux_heads")))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # another architecture or dataset
            raise StorageError(f"{self.uri}: checkpoint does not fit dataset '{spec.name}' and its "
                               f"recorded model config ({type(e).__name__}: {e})") from None

    def load_optimizer(self, model: MultiTaskRanker) -> torch.optim.Optimizer:
        """The optimizer as the parent left it; a fresh one for checkpoints that hold no
        state (bootstrap or older layouts). Parameters the parent lacked (new auxiliary
        heads) start with fresh state."""
        opt = make_optimizer(model)
        state = self.meta.get("optimizer")
        if state is not None:
            try:
                load_optimizer_state(opt, model, part.read_blob(self.uri, OPTIMIZER), state, strict=False)
            except ValueError as e:  # truncated or foreign state under a manifest that lists it
                raise StorageError(f"{sfs.join(self.uri, OPTIMIZER)}: optimizer state of {self.version} cannot "
                                   f"be restored ({e}); re-publish the checkpoint (re-run its day with "
                                   f"--force) or bootstrap again") from None
        return opt


def folder_of(uri: str) -> tuple[str, str, dt.date] | None:
    """(dataset, name, date) of a checkpoint folder ``.../models/<dataset>/<name>/date=D``
    (None for a URI not laid out so)."""
    segments = sfs.normalize(uri).rstrip("/").split("/")
    if len(segments) < 4 or segments[-4] != "models" or not segments[-1].startswith("date="):
        return None
    try:
        return segments[-3], segments[-2], dt.date.fromisoformat(segments[-1][len("date="):])
    except ValueError:
        return None


def check_folder(ckpt: Checkpoint, dataset: str, name: str, day: dt.date) -> None:
    """A checkpoint is only what its meta records: the folder it sits in must be its own.

    The folder is what lineage, warm starts and labels look up by (model, date); a
    checkpoint copied or moved into another model's (or day's) folder would otherwise
    become that model's parent or teacher without a word. Metas written before they
    recorded the dataset are judged on name, date and version."""
    m = ckpt.meta
    own = (m.get("name") == name and m.get("dataset", dataset) == dataset
           and m.get("trained_through") == day.isoformat()
           and str(m.get("version", "")).startswith(f"{name}-{day:%Y%m%d}-"))
    if not own:
        raise LineageError(f"{ckpt.uri} holds a checkpoint of '{m.get('name')}' (dataset {m.get('dataset', '?')}, "
                           f"trained through {m.get('trained_through')}, version {m.get('version')}); refusing it "
                           f"as {name}'s (dataset {dataset}, trained through {day}): a checkpoint is only valid in "
                           f"the folder of the model and date it was published for")


def read_checkpoint(uri: str) -> Checkpoint:
    """The checkpoint at ``uri``; when the URI is a model folder, the meta must be that
    model's, dataset's and date's (:func:`check_folder`), else LineageError."""
    try:
        meta = json.loads(part.read_blob(uri, META))
    except ValueError as e:
        raise StorageError(f"{sfs.join(uri, META)}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "version" not in meta or "trained_through" not in meta:
        raise StorageError(f"{sfs.join(uri, META)}: not a checkpoint meta (no version / trained_through)")
    ckpt = Checkpoint(uri=sfs.normalize(uri), meta=meta)
    if (where := folder_of(ckpt.uri)) is not None:
        check_folder(ckpt, *where)
    return ckpt


def find_checkpoint(root: str, dataset: str, name: str, day: dt.date | str) -> Checkpoint:
    """The checkpoint of ``name`` trained through ``day``: StorageError when there is none,
    LineageError when its folder holds another model's (or day's) checkpoint."""
    uri = checkpoint_uri(root, dataset, name, day)
    try:
        ckpt = read_checkpoint(uri)
    except StorageError as e:
        if e.transient:  # storage did not answer: the checkpoint may well be there
            raise
        raise StorageError(f"no checkpoint of '{name}' trained through {parse_date(day)} at {uri}") from None
    check_folder(ckpt, dataset, name, parse_date(day))
    return ckpt


def find_version(root: str, dataset: str, name: str, version: str) -> Checkpoint:
    """The checkpoint with this exact version string (``<name>-<YYYYMMDD>-<hash>``)."""
    try:
        day = dt.datetime.strptime(version.rsplit("-", 2)[-2], "%Y%m%d").date()
    except (ValueError, IndexError):
        raise LineageError(f"malformed model version '{version}': expected <name>-<YYYYMMDD>-<hash>") from None
    ckpt = find_checkpoint(root, dataset, name, day)
    if ckpt.version != version:
        raise LineageError(f"version '{version}' not found: {ckpt.uri} holds '{ckpt.version}'")
    return ckpt


def parent_for(root: str, dataset: str, name: str, day: dt.date) -> Checkpoint | None:
    """The parent a day step warm-starts from: the newest checkpoint before ``day``.

    None (a cold start) only when the model has no checkpoint at all: a day dated before
    the model's first checkpoint (its bootstrap) would start a second, orphan lineage from
    random weights beside the real one, so it is refused."""
    days = list_checkpoints(root, dataset, name)
    before = [d for d in days if d < day]
    if not before and any(d > day for d in days):  # (a checkpoint of ``day`` itself is a re-run of it)
        raise LineageError(f"'{name}' has no checkpoint before {day}: its first is trained through {min(days)} "
                           f"({checkpoint_uri(root, dataset, name, min(days))}); train days after {min(days)}, "
                           f"or bootstrap again through a date before {day}")
    return find_checkpoint(root, dataset, name, max(before)) if before else None


def check_parent(parent: Checkpoint | None, day: dt.date) -> None:
    if parent is not None and parent.trained_through >= day:
        raise LineageError(f"refusing parent {parent.version}: it is trained through "
                           f"{parent.trained_through}, not before {day}")


def make_version(name: str, day: dt.date, weights: bytes) -> str:
    return f"{name}-{day:%Y%m%d}-{hashlib.sha256(weights).hexdigest()[:12]}"


def publish_checkpoint(root: str, dataset: str, name: str, day: dt.date, model: MultiTaskRanker,
                       meta: dict[str, Any], extra_blobs: dict[str, bytes] | None = None,
                       optimizer: torch.optim.Optimizer | None = None,
                       expected: str | None | bool = True) -> Checkpoint:
    """Publish weights (and, when the model has auxiliary heads, the serving export
    without them), the optimizer state when given, plus metadata; the version is derived
    from the weights' bytes.

    ``expected`` is the generation of the checkpoint's manifest that the step read when
    it started (:func:`part.manifest_generation` of :func:`checkpoint_uri`; None: there
    was none): a checkpoint of other content committed for the same model and day while
    this one trained wins, and this publish is a ConflictError instead of replacing it.
    ``True`` reads it now (nothing to protect)."""
    weights = model_to_bytes(model)
    meta = dict(meta, name=name, version=make_version(name, day, weights), trained_through=day.isoformat(),
                model=model.config.model_dump(mode="json"), aux_heads=bool(len(model.aux_heads)),
                aux_tasks=list(model.aux_tasks), params=model.param_count(),
                flops_per_example=model.flops_per_example(),
                serving_params=model.param_count(serving=True),
                serving_flops_per_example=model.flops_per_example(serving=True))
    blobs = {WEIGHTS: weights, **(extra_blobs or {})}
    if optimizer is not None:
        blobs[OPTIMIZER], meta["optimizer"] = optimizer_state_to_bytes(optimizer, model)
    if bool(len(model.aux_heads)):
        blobs[SERVING] = model_to_bytes(export_serving(model))
    blobs[META] = (json.dumps(meta, sort_keys=True, indent=1, default=str) + "\n").encode()
    uri = checkpoint_uri(root, dataset, name, day)
    part.publish_blobs(uri, blobs, {"kind": "checkpoint", "version": meta["version"]}, expected=expected)
    return Checkpoint(uri=uri, meta=meta)


def lineage(root: str, dataset: str, name: str, day: dt.date | str) -> list[Checkpoint]:
    """The chain from the checkpoint through ``day`` back to its cold start, newest first;
    raises LineageError when a parent named in a meta is missing or not older."""
    chain = [find_checkpoint(root, dataset, name, day)]
    while chain[-1].meta.get("parent"):
        child = chain[-1]
        parent = find_version(root, dataset, name, child.meta["parent"])
        if parent.trained_through >= child.trained_through:
            raise LineageError(f"{child.version}: parent {parent.version} is not older")
        chain.append(parent)
    return chain
