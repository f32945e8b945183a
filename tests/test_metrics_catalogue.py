"""docs/metrics.md against mirror.metrics.REGISTRY, and the naming rules every metric follows.

The registry is the truth: the catalogue must list exactly its metrics, with the type and the
labels a scrape shows. Names follow Prometheus conventions and labels come from bounded sets,
whose values the catalogue lists and this module checks against the enums they come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from mirror.decode.families import FAMILIES
from mirror.decode.records import (
    Family,
    Reason,
)
from mirror.ops import metrics

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "docs" / "metrics.md"

PREFIX = "flespi_mirror_"
# Exported by prometheus_client's ProcessCollector and PlatformCollector, unprefixed by design.
STANDARD_PREFIXES = ("process_", "python_")
HISTOGRAM_UNITS = ("_seconds", "_messages", "_bytes")
NON_BASE_UNITS = re.compile(
    r"_(milliseconds|microseconds|nanoseconds|ms|us|ns|minutes|hours|days|"
    r"kilobytes|megabytes|gigabytes|kb|mb|gb|percent)(_|$)"
)
UNBOUNDED_LABEL = re.compile(r"device|topic|ident|client|phone|payload|(^|_)id$|^id_")


@dataclass(frozen=True)
class Documented:
    name: str
    type: str
    labels: tuple[str, ...]
    meaning: str


@dataclass(frozen=True)
class Exported:
    name: str  # as a scrape shows it (counters with _total, info metrics with _info)
    type: str  # the scrape's TYPE (an info metric is a gauge)
    labels: tuple[str, ...]
    help: str


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented_metrics() -> dict[str, Documented]:
    """Rows of every markdown table whose header starts with "| Metric | Type | Labels |"."""
    found: dict[str, Documented] = {}
    in_table = False
    for line in CATALOGUE.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells[:3] == ["Metric", "Type", "Labels"]:
            in_table = True
            continue
        if not in_table or set(cells[0]) <= {"-", ":"}:
            continue
        name = cells[0].strip("`")
        assert name not in found, f"{name} is listed twice in {CATALOGUE.name}"
        labels = tuple(sorted(re.findall(r"`([a-z_]+)`", cells[2])))
        found[name] = Documented(name, cells[1], labels, cells[3])
    return found


def documented_label_values() -> dict[str, str]:
    """The "| Label | Values |" table: label name -> the cell listing its values."""
    values: dict[str, str] = {}
    in_table = False
    for line in CATALOGUE.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells[:2] == ["Label", "Values"]:
            in_table = True
            continue
        if in_table and not set(cells[0]) <= {"-", ":"}:
            values[cells[0].strip("`")] = cells[1]
    return values


def _wrappers() -> dict[str, MetricWrapperBase]:
    """The mirror's own metric objects, by the name their family has in collect()."""
    wrappers: dict[str, MetricWrapperBase] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            wrappers[value._name] = value
    return wrappers


def exported_metrics() -> dict[str, Exported]:
    """Every family of the registry, named and typed as a text-format scrape shows it."""
    wrappers = _wrappers()
    exported: dict[str, Exported] = {}
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            name, kind = f"{family.name}_total", "counter"
        elif family.type == "info":
            name, kind = f"{family.name}_info", "gauge"
        else:
            name, kind = family.name, family.type
        labels = {key for sample in family.samples for key in sample.labels}
        wrapper = wrappers.get(family.name)
        if wrapper is not None:
            # Declared labels: known even before a labelled series has its first sample.
            labels |= set(wrapper._labelnames)
        labels -= {"le", "quantile"}
        exported[name] = Exported(name, kind, tuple(sorted(labels)), family.documentation)
    return exported


def mirror_metric_names() -> list[str]:
    return [name for name in exported_metrics() if not name.startswith(STANDARD_PREFIXES)]


# ---------------------------------------------------------------------------------------------
# The catalogue and the registry agree


def test_catalogue_lists_exactly_the_registered_metrics() -> None:
    documented = set(documented_metrics())
    exported = set(exported_metrics())
    assert documented - exported == set(), "documented but not in mirror.metrics.REGISTRY"
    assert exported - documented == set(), f"registered but missing from {CATALOGUE}"


@pytest.mark.parametrize("name", sorted(exported_metrics()))
def test_catalogue_gives_each_metric_its_type_labels_and_a_meaning(name: str) -> None:
    exported = exported_metrics()[name]
    documented = documented_metrics()[name]
    assert documented.type == exported.type
    assert documented.labels == exported.labels
    assert len(documented.meaning) > 15, f"{name}: say what the metric means"


def test_every_metric_of_the_mirror_has_help_text() -> None:
    for name in mirror_metric_names():
        assert len(exported_metrics()[name].help) > 10, name


def test_the_issues_minimum_set_of_metrics_exists() -> None:
    exported = exported_metrics()
    required = {
        "flespi_mirror_messages_received_total": ("family", "qos"),
        "flespi_mirror_rows_written_total": ("operation", "table"),
        "flespi_mirror_dead_letters_total": ("reason",),
        "flespi_mirror_batch_messages": (),
        "flespi_mirror_commit_duration_seconds": (),
        "flespi_mirror_lag_seconds": (),
        "flespi_mirror_unacked_messages": (),
        "flespi_mirror_reconnects_total": (),
        "flespi_mirror_mqtt_connected": (),
        "flespi_mirror_last_commit_timestamp_seconds": (),
        "flespi_mirror_build_info": ("version",),
    }
    for name, labels in required.items():
        assert name in exported, f"{name} is missing"
        assert exported[name].labels == labels, name
    for histogram in ("batch_messages", "commit_duration_seconds", "lag_seconds"):
        assert exported[PREFIX + histogram].type == "histogram"


# ---------------------------------------------------------------------------------------------
# Naming conventions


def test_mirror_metrics_carry_the_prefix_and_others_are_the_standard_ones() -> None:
    for name in exported_metrics():
        assert name.startswith((PREFIX, *STANDARD_PREFIXES)), name


def test_counters_and_only_counters_end_in_total() -> None:
    for name, metric in exported_metrics().items():
        assert name.endswith("_total") == (metric.type == "counter"), name


def test_histograms_are_in_base_units_or_count_messages() -> None:
    for name, metric in exported_metrics().items():
        if metric.type == "histogram":
            assert name.endswith(HISTOGRAM_UNITS), f"{name}: end in a unit {HISTOGRAM_UNITS}"


def test_names_use_base_units() -> None:
    for name in exported_metrics():
        assert not NON_BASE_UNITS.search(name), f"{name}: use seconds and bytes"
    timestamps = [name for name in mirror_metric_names() if "timestamp" in name]
    assert timestamps and all(name.endswith("_timestamp_seconds") for name in timestamps)


def test_no_label_could_hold_a_device_id_or_a_topic() -> None:
    for name, metric in exported_metrics().items():
        for label in metric.labels:
            assert not UNBOUNDED_LABEL.search(label), f"{name} has an unbounded label {label!r}"


# ---------------------------------------------------------------------------------------------
# Bounded label sets, documented


def _values(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def test_every_label_of_the_mirror_has_its_values_documented() -> None:
    documented = documented_label_values()
    for name in mirror_metric_names():
        for label in exported_metrics()[name].labels:
            assert label in documented, f"{label} ({name}) is missing from the label values table"


def test_documented_label_values_match_the_code() -> None:
    documented = documented_label_values()
    # What readers query: the state tables and the history tables (device and channel messages
    # through their views over both tiers), as the families name them.
    written_tables = {spec.table for spec in FAMILIES}
    expected = {
        "family": {str(f) for f in Family},
        "reason": {str(r) for r in Reason},
        "table": written_tables,
        "operation": {"upsert", "delete", "append", "stale", "duplicate"},
        "qos": {"0", "1"},
        "kind": set(metrics.DATABASE_ERROR_KINDS),
    }
    for label, values in expected.items():
        assert _values(documented[label]) == values, label
    assert "mirror.__version__" in documented["version"]


def test_rows_written_labels_are_the_store_statements() -> None:
    """The statements are keyed "<table>.<operation>"; the metric reports those (merge is
    folded into objects and not counted; dead letters have their own counter), plus the
    stale and duplicate outcomes of upsert and append."""
    from mirror.store.statements import STATEMENTS

    pairs = [key.split(".") for key in STATEMENTS]
    counted = [(t, op) for t, op in pairs if t != "dead_letters" and not op.startswith("merge")]
    documented = documented_label_values()
    assert {t for t, _ in counted} == _values(documented["table"])
    assert {op for _, op in counted} | {"stale", "duplicate"} == _values(documented["operation"])


def test_observe_many_counts_as_observe_does_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from mirror.ops.metrics import observe_many

    amounts = [0.0, 0.004, 0.005, 0.0051, 1.0, 2.5, 60.0, 1e9, 7.25]
    one, many = CollectorRegistry(), CollectorRegistry()
    single = Histogram("lag_seconds", "x", registry=one, buckets=(0.005, 1, 2.5, 60))
    bulk = Histogram("lag_seconds", "x", registry=many, buckets=(0.005, 1, 2.5, 60))
    for amount in amounts:
        single.observe(amount)
    observe_many(bulk, amounts)
    observe_many(bulk, [])

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for metric in registry.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        }

    assert samples(many) == samples(one)
    assert samples(one)[("lag_seconds_bucket", "0.005")] == 3
