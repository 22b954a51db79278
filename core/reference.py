"""Published reference numbers shipped in ``data/`` (each file names its sources in its header)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.errors import MissingFileError
from core.workspace import Workspace

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
REFERENCE_COLUMNS = ("source", "model", "dataset", "corruption", "severity", "adaptation", "metric", "value")


def read_table(name: str) -> pd.DataFrame:
    """A CSV of ``data/`` (``#`` lines are its provenance header)."""
    path = DATA_DIR / name
    if not path.exists():
        raise MissingFileError(f"reference table {path} is missing from this installation")
    return pd.read_csv(path, comment="#")


def reference_results() -> pd.DataFrame:
    """``data/reference_results.csv`` with the catalog's column types (empty corruption -> None)."""
    df = read_table("reference_results.csv")
    df["corruption"] = df["corruption"].astype(object).where(df["corruption"].notna(), None)
    df["severity"] = df["severity"].astype(int)
    df["value"] = df["value"].astype(float)
    return df[list(REFERENCE_COLUMNS)]


def load_reference_results(ws: Workspace) -> int:
    """Replace the shipped sources' rows in ``reference_results`` (idempotent); returns rows loaded."""
    df = reference_results()
    sources = sorted(df["source"].unique())
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    placeholders = ", ".join("?" for _ in sources)
    return ws.catalog.insert("reference_results", rows, replace_where=f"source IN ({placeholders})",
                             replace_params=sources)
