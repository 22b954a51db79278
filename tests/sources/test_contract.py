"""Every registered source passes the same contract (timm style: a new source is tested as it registers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sources import INDEX_COLUMNS, SKIP_REASONS, SOURCES, IssueReport

from .conftest import SOURCE_CASES


def test_every_source_has_a_case() -> None:
    missing = sorted(set(SOURCES.names()) - set(SOURCE_CASES))
    assert not missing, f"add a builder to SOURCE_CASES in tests/sources/conftest.py for: {missing}"


@pytest.mark.parametrize("kind", SOURCES.names())
def test_source_contract(kind: str, tmp_path: Path) -> None:
    if kind not in SOURCE_CASES:
        pytest.fail(f"no SOURCE_CASES entry for source {kind!r}")
    case = SOURCE_CASES[kind](tmp_path)
    entry = SOURCES.entry(kind)
    options = entry.validate_params(case.options)  # defaults resolve without error
    source = entry.obj(case.uri, **options)
    report = IssueReport()
    rows = list(source.scan(report, verify=True))

    assert len(rows) == case.n_samples
    assert report.n_skipped == 0, report.summary()
    for row in rows:
        assert tuple(row)[: len(INDEX_COLUMNS)] == INDEX_COLUMNS
        assert isinstance(row["id"], str)
    assert len({r["id"] for r in rows}) == len(rows)

    classes = source.classes()
    labels = [r["label"] for r in rows if r["label"] is not None]
    if case.labelled:
        assert classes and labels
    if classes is not None:
        assert all(isinstance(label, int) and 0 <= label < len(classes) for label in labels)

    assert source.has_images is case.has_images
    if case.has_images:
        image = source.load_image(rows[0])
        assert image.mode == "RGB" and image.size[0] > 0
        assert source.read_bytes(rows[0])


@pytest.mark.parametrize("kind", SOURCES.names())
def test_source_metadata(kind: str) -> None:
    entry = SOURCES.entry(kind)
    assert entry.summary
    assert len({p.name for p in entry.params}) == len(entry.params)


def test_skip_reasons_are_described() -> None:
    assert {"remote_image", "path_outside_root", "file_too_large", "duplicate_id", "bad_embedding"} <= set(SKIP_REASONS)
    assert all(isinstance(text, str) and text for text in SKIP_REASONS.values())
