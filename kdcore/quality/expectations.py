"""Great Expectations (GX Core 1.x, called directly) for day D: a suite generated from the
reference profile, run through an ephemeral context with a Checkpoint whose Data Docs
site is written to a local directory (the caller uploads it to object storage).

GX has no two-sample PSI/JS expectation, so the shift figures computed in shift.py are
attached to the validation result's meta under "kd_shift" (and written, with the whole
result, to `kd_validation_result.json` beside index.html). GX's page renderer only shows
run and batch metadata, so the figures live in that JSON, not in the HTML.

Not used: ExpectColumnQuantileValuesToBeBetween (its result holds np.bool_, which does
not serialize with numpy 2.4).

Timing (this 2-core machine, shared, MovieLens spec: 26 columns, 59 expectations):
importing GX costs 4.5-7 s once per process; `validate_day` then takes 1.5-2.6 s on 500
rows and 2.0-3.3 s on 100k rows. Nearly all of it is GX's fixed overhead (per-expectation
metric graphs, Jinja compilation for the Data Docs pages), not the data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from kdcore.data.spec import DatasetSpec
from kdcore.quality.profile import CategoricalProfile, Profile
from kdcore.quality.shift import ShiftReport

GX_LOGGER = "great_expectations"
# Warnings GX (and what it imports) emits on import or on every run; none of them is ours to act on.
_NOISY_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # (message regex, category, module regex)
    (r".*", DeprecationWarning, r"great_expectations(\.|$)"),
    (r".*", PendingDeprecationWarning, r"great_expectations(\.|$)"),
    (r".*", FutureWarning, r"great_expectations(\.|$)"),
    (r"Please install grpcio-status", ImportWarning, r""),
    (r"module 'sre_(constants|parse)' is deprecated", DeprecationWarning, r""),
]


@contextlib.contextmanager
def quiet_gx(level: int = logging.WARNING) -> Iterator[None]:
    """GX logs ~220 INFO lines per process (public-API registration on import, "Multiple
    declarations of metric ...", "Created temporary directory ...") that drown a task log.
    For the duration of the block: the ``great_expectations`` logger, and any of its
    children GX gave an explicit level below ``level`` (it sets some to INFO), log at
    ``level`` and up only; GX's known noisy warnings are ignored. Everything is restored on
    exit, so logging set up by the caller is left as it was."""
    manager = logging.Logger.manager
    saved: dict[str, int] = {}

    def lower(lg: logging.Logger) -> None:
        if lg.level < level:
            saved[lg.name] = lg.level
            lg.setLevel(level)

    lower(logging.getLogger(GX_LOGGER))
    for name, lg in list(manager.loggerDict.items()):
        # children left at NOTSET inherit the parent's level; explicit ones need their own
        if name.startswith(GX_LOGGER + ".") and isinstance(lg, logging.Logger) and lg.level != logging.NOTSET:
            lower(lg)
    with warnings.catch_warnings():
        for message, category, module in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        try:
            yield
        finally:
            for name, old in saved.items():
                logging.getLogger(name).setLevel(old)


os.environ["GX_ANALYTICS_ENABLED"] = "false"  # no analytics (no network); must precede the GX import

with quiet_gx():  # importing GX logs one INFO line per public API it registers (214 of them)
    import great_expectations as gx  # noqa: E402
    import great_expectations.expectations as gxe  # noqa: E402
    from great_expectations.checkpoint import UpdateDataDocsAction  # noqa: E402
    from great_expectations.core.run_identifier import RunIdentifier  # noqa: E402
    from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

SITE_NAME = "kd_local_site"
SHIFT_META_KEY = "kd_shift"
RESULT_JSON = "kd_validation_result.json"


@dataclass(frozen=True)
class SuiteOptions:
    """Knobs of the generated suite. `mostly` tolerates a small share of outliers; numeric
    ranges widen the reference [min, max] by `range_tolerance` x its span on each side;
    categorical columns whose top values cover less than `min_top_coverage` of the
    reference (ids) get no value-set expectation."""

    mostly: float = 0.99
    range_tolerance: float = 0.1
    min_top_coverage: float = 0.999
    row_count_min_factor: float = 0.1
    row_count_max_factor: float = 10.0


class ExpectationResult(BaseModel):
    """Outcome of `validate_day` (JSON-serializable, e.g. for XCom)."""

    model_config = ConfigDict(extra="forbid")

    success: bool
    evaluated: int
    successful: int
    unsuccessful: int
    failed_expectations: list[str]  # "expectation_type(column)" of each failed expectation
    index_html: Path | None  # Data Docs entry page inside docs_dir
    result_json: Path  # the full validation result, shift figures in meta["kd_shift"]


# --------------------------------------------------------------------------- suite


def _typed_values(cat: CategoricalProfile) -> list[Any]:
    """The profile's top values (strings) as values of the column's own type, so the set
    matches what pandas holds (ints stay ints)."""
    arr = pa.array(cat.values, type=pa.string())
    try:
        return arr.cast(pa.type_for_alias(cat.arrow_type)).to_pylist()
    except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return cat.values


def build_suite(profile: Profile, spec: DatasetSpec, options: SuiteOptions | None = None,
                name: str | None = None) -> gx.ExpectationSuite:
    """Expectations derived from the reference profile: the spec's columns exist, ids are
    unique and non-null, hard labels are non-null, numeric values stay near the reference
    range, low-cardinality categoricals stay within the reference values, and the row count
    is within a factor of the reference per-day average."""
    o = options or SuiteOptions()
    exps: list[gxe.Expectation] = [gxe.ExpectColumnToExist(column=c) for c in spec.required_columns]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c)
             for c in [spec.example_id, *[t.label_column for t in spec.tasks]]]
    exps.append(gxe.ExpectColumnValuesToBeUnique(column=spec.example_id))

    for col, num in profile.numeric.items():
        if num.min is None or num.max is None:
            continue
        span = num.max - num.min or max(abs(num.min), 1.0)
        pad = o.range_tolerance * span
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=num.min - pad, max_value=num.max + pad, mostly=o.mostly))

    for col, cat in profile.categorical.items():
        nonnull = sum(cat.counts) + cat.other_count
        if not cat.values or (nonnull and sum(cat.counts) / nonnull < o.min_top_coverage):
            continue  # high cardinality (ids): a value set would be meaningless
        exps.append(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=_typed_values(cat), mostly=o.mostly))

    per_day = profile.rows_per_day
    exps.append(gxe.ExpectTableRowCountToBeBetween(
        min_value=int(math.floor(o.row_count_min_factor * per_day)),
        max_value=int(math.ceil(o.row_count_max_factor * per_day))))
    # Built in one go: add_expectation() on a suite needs an active Data Context.
    return gx.ExpectationSuite(name=name or f"{spec.name}_day_quality", expectations=exps)


# --------------------------------------------------------------------------- run


class _ShiftMetaDataDocsAction(UpdateDataDocsAction):
    """UpdateDataDocsAction that first attaches the shift figures to each validation
    result's meta and re-stores it, so the stored result (and the docs built from the
    store) carry them. Subclassing keeps GX's rule that docs actions run first."""

    type: Literal["kd_shift_meta_update_data_docs"] = "kd_shift_meta_update_data_docs"
    shift_meta: dict = {}

    def run(self, checkpoint_result, action_context=None) -> dict:  # type: ignore[override]
        store = self._resolve_context().context.validation_results_store
        for key, result in checkpoint_result.run_results.items():
            result.meta[SHIFT_META_KEY] = self.shift_meta
            store.set(key, result)
        return super().run(checkpoint_result, action_context)


def _context(docs_dir: Path):
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(ctx.list_data_docs_sites()):
        ctx.delete_data_docs_site(site)  # the default site points at a throwaway temp dir
    ctx.add_data_docs_site(SITE_NAME, {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    return ctx


def _failed_names(result) -> list[str]:
    names = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        col = cfg.kwargs.get("column")
        names.append(f"{cfg.type}({col})" if col else cfg.type)
    return names


def validate_day(data: pa.Table, profile: Profile, spec: DatasetSpec, shift_report: ShiftReport | None,
                 docs_dir: str | Path, options: SuiteOptions | None = None,
                 run_name: str | None = None) -> ExpectationResult:
    """Validate day D with the profile-derived suite and write the Data Docs site into
    `docs_dir`. Returns the outcome; a failing suite is a result, not an exception. GX's
    INFO logging and its known warnings are silenced while it runs (see `quiet_gx`)."""
    with quiet_gx():
        return _validate_day(data, profile, spec, shift_report, docs_dir, options, run_name)


def _validate_day(data: pa.Table, profile: Profile, spec: DatasetSpec, shift_report: ShiftReport | None,
                  docs_dir: str | Path, options: SuiteOptions | None, run_name: str | None) -> ExpectationResult:
    docs_dir = Path(docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(docs_dir)
    batch_def = (ctx.data_sources.add_pandas("kd_day").add_dataframe_asset(spec.name)
                 .add_batch_definition_whole_dataframe("whole_day"))
    suite = ctx.suites.add(build_suite(profile, spec, options))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{spec.name}_day", data=batch_def,
                                                                suite=suite))
    shift_meta = json.loads(shift_report.model_dump_json()) if shift_report is not None else {}
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"{spec.name}_day_checkpoint", validation_definitions=[vd],
        actions=[_ShiftMetaDataDocsAction(name="data_docs", site_names=[SITE_NAME], shift_meta=shift_meta)],
        result_format={"result_format": "SUMMARY"}))

    run = checkpoint.run(batch_parameters={"dataframe": data.to_pandas()},
                         run_id=RunIdentifier(run_name=run_name or f"{spec.name}_day"))
    result = next(iter(run.run_results.values()))
    stats = result.statistics
    result_json = docs_dir / RESULT_JSON
    result_json.write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
    index = docs_dir / "index.html"
    return ExpectationResult(success=bool(result.success), evaluated=int(stats["evaluated_expectations"]),
                             successful=int(stats["successful_expectations"]),
                             unsuccessful=int(stats["unsuccessful_expectations"]),
                             failed_expectations=_failed_names(result),
                             index_html=index if index.exists() else None, result_json=result_json)
