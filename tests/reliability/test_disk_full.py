"""A disk that fills up mid-write ends with a clean error and an intact catalog; freeing space, the same command
then finishes the work.

The real CLI (``python -m core.cli``) runs in a subprocess whose file size limit (``RLIMIT_FSIZE``, set in
``preexec_fn`` with SIGXFSZ ignored, so a write past the limit fails with EFBIG instead of killing the process)
is below the size of the stage's big output: importing LAION embeddings (a 6 MB shard), clustering (1.8 MB of
assignments), pruning (a 0.7 MB manifest), exporting kept ids (1.6 MB of text) and a classifier training's
checkpoint (1.4 MB, written by torch.save, whose short write has no errno). The catalog file is already
larger than the limit, so DuckDB cannot checkpoint either (it keeps the rows in its WAL). When the tests run as
root and ``mount -t tmpfs`` works, a workspace on a tmpfs that is nearly full gives a real ENOSPC; and a bulk
insert into the catalog itself past the limit must roll back with the same clean error.

Each case asserts: a non-zero exit (DiskFull's code), one ``error: disk full: ...`` line on stderr and no
traceback, no temporary file anywhere and no partial file under a real name (what is visible reads whole), every
catalog table as it was before (a run row the command made is ``failed``, never ``running``); then, with the
limit lifted, the same command (for training: ``--resume RUN_ID``) succeeds, and its output equals the one an
unconstrained run made.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.errors import DiskFull
from core.workspace import Workspace
from tests.jobs.test_jobs import laion_workspace, temp_files, write_release
from tests.reliability.test_kill_resume_stages import assert_whole

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_ROWS = 100_000
DIM = 32
#: Bytes a file may reach in the limited process: above every small file a command writes (meta.json,
#: centroids, the catalog's WAL), below each case's big output.
LIMIT = 400_000
SET_ID = "pool.synthetic.image"


# -- the base workspace: an imported set, a clustering and a pruning, made without any limit ---------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.clustering import ClusterConfig, run_clustering
    from core.prune.manifest import PruneConfig, run_pruning

    root = tmp_path_factory.mktemp("diskfull")
    write_release(root / "release", n=N_ROWS, dim=DIM)
    ws, set_id = laion_workspace(root / "ws", root / "release")
    assert set_id == SET_ID
    run_clustering(ws, ClusterConfig(embedding_set=SET_ID, k=8, niter=5, clustering_id="base"))
    run_pruning(ws, PruneConfig(clustering_id="base", chain=[("random", {"keep_fraction": 0.5})], pruning_id="half"))
    return root / "ws"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def limited(limit: int | None) -> object:
    """``preexec_fn`` of a child whose files may not grow past ``limit`` bytes (None: no limit)."""

    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() rather than death by signal
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def cli(ws: Path, args: list[str], limit: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PRUNESCOPE_WORKSPACE": str(ws)}
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300, preexec_fn=limited(limit))


# -- checks ------------------------------------------------------------------------------------------------------
def catalog_dump(ws: Path) -> dict[str, pd.DataFrame]:
    """Every table of the catalog, rows sorted (the catalog must open: that is part of the check)."""
    catalog = Workspace(ws, create=False).catalog
    tables = catalog.query("SELECT table_name FROM information_schema.tables ORDER BY table_name")["table_name"]
    return {t: catalog.query(f"SELECT * FROM {t} ORDER BY ALL").reset_index(drop=True) for t in tables}


def assert_catalog_unchanged(before: dict[str, pd.DataFrame], ws: Path) -> None:
    """Every table as before, except new ``runs`` rows, which must be ``failed`` with the disk-full message."""
    after = catalog_dump(ws)
    assert set(after) == set(before)
    for table, rows in before.items():
        now = after[table]
        if table == "runs":
            new = now[~now["id"].isin(rows["id"])]
            assert (new["status"] == "failed").all(), new[["id", "status", "message"]]
            assert new["message"].str.contains("disk full").all(), new["message"].tolist()
            now = now[now["id"].isin(rows["id"])].reset_index(drop=True)
        pd.testing.assert_frame_equal(now, rows, check_dtype=False, obj=table)


def assert_clean_error(proc: subprocess.CompletedProcess[str], reason: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == DiskFull.exit_code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: disk full:"), err
    assert reason in err, err
    return err


# -- the CLI cases ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    #: The big file the command writes (workspace-relative; ``{out}`` = a folder outside the workspace) ...
    target: str
    #: ... and the same file made by the unconstrained base run, which the resumed run must equal.
    same_as: str


CASES = {
    "import-laion": Case(("embeddings", "import-laion", "pool", "--model", "synthetic", "--set-id", "again"),
                         "embeddings/again/image/part-00000.npy", f"embeddings/{SET_ID}/image/part-00000.npy"),
    "cluster": Case(("cluster", SET_ID, "--k", "8", "--niter", "5", "--id", "again"),
                    "clusters/again/assignments.parquet", "clusters/base/assignments.parquet"),
    "prune": Case(("prune", "base", "--step", "random:keep_fraction=0.5", "--id", "again"),
                  "manifests/again.parquet", "manifests/half.parquet"),
    "export": Case(("export", "half", "--out", "{out}/kept.txt", "--format", "ids"), "{out}/kept.txt", ""),
}


def same_content(a: Path, b: Path) -> bool:
    if a.suffix == ".parquet":  # the rows (the footer's key-value metadata may differ)
        x, y = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
        if list(x.columns) != list(y.columns) or len(x) != len(y):
            return False
        # Float columns within 1e-6: BLAS/faiss sums in another order with another thread count (the
        # reference runs in this process, the rerun in a subprocess); everything else exactly.
        floats = [c for c in x.columns if x[c].dtype.kind == "f"]
        exact = [c for c in x.columns if c not in floats]
        return x[exact].equals(y[exact]) and all(
            np.allclose(x[c].to_numpy(), y[c].to_numpy(), rtol=0, atol=1e-6, equal_nan=True) for c in floats)
    return a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("name", list(CASES))
def test_a_file_size_limit_mid_write_fails_cleanly_and_the_rerun_finishes(name: str, base: Path, tmp_path: Path):
    case = CASES[name]
    ws, out = tmp_path / "ws", tmp_path / "out"
    shutil.copytree(base, ws)
    out.mkdir()
    args = [a.replace("{out}", str(out)) for a in case.args]
    target = Path(case.target.replace("{out}", str(out)))
    target = target if target.is_absolute() else ws / target
    before = catalog_dump(ws)

    failed = cli(ws, args, limit=LIMIT)
    print(f"{name}: {failed.stderr.strip()}")
    assert_clean_error(failed, "file too large")
    assert not target.exists(), f"a partial {target.name} under its real name"
    assert_whole(ws)
    assert_whole(out)
    assert_catalog_unchanged(before, ws)

    done = cli(ws, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.is_file() and not temp_files(ws) and not temp_files(out)
    if case.same_as:
        assert same_content(target, ws / case.same_as)
    else:  # the export: the kept ids of the base pruning, one per line
        from core.prune.manifest import kept_ids

        assert target.read_text().splitlines() == kept_ids(Workspace(ws, create=False), "half")
    catalog_dump(ws)  # opens after the checkpoint of everything the failed run left in the WAL


def test_a_checkpoint_past_the_limit_fails_cleanly_and_the_run_resumes(tmp_path: Path):
    """torch.save reports a short write as ``RuntimeError: unexpected pos`` (no errno): still a clean error."""
    import torch

    from core.datasets import register_dataset
    from tests.jobs.test_kill_resume import make_shapes

    make_shapes(tmp_path / "shapes", per_class=8)
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "shapes", "image_folder", tmp_path / "shapes")
    before = catalog_dump(ws.root)
    args = ["train", "classifier", "shapes", "--steps", "4", "--batch-size", "8", "--device", "cpu",
            "-o", "checkpoint_every=2", "-o", "cpu_threads=1"]

    failed = cli(ws.root, args, limit=LIMIT)  # a resnet-demo checkpoint is 1.4 MB
    print(f"train classifier: {failed.stderr.strip()}")
    assert_clean_error(failed, "file too large")
    assert "checkpoints/step-000002.pt" in failed.stderr
    assert_whole(ws.root)
    assert_catalog_unchanged(before, ws.root)
    run_id = ws.catalog.query("SELECT id FROM runs WHERE kind = 'train-classifier'")["id"].item()
    assert not list(ws.dir("runs", run_id).rglob("*.pt"))

    done = cli(ws.root, ["train", "classifier", "--resume", run_id])
    assert done.returncode == 0, done.stderr[-3000:]
    last = torch.load(ws.dir("runs", run_id, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
    assert last["step"] == 4 and not temp_files(ws.root)
    assert ws.catalog.query("SELECT status FROM runs WHERE id = ?", [run_id])["status"].item() == "done"


# -- the catalog itself ---------------------------------------------------------------------------------------
BULK_INSERT = """
import sys
from core.errors import DiskFull
from core.workspace import Workspace

ws = Workspace(sys.argv[1], create=False)
rows = [{"run_id": "bulk", "model": f"m{i}", "dataset": "d", "corruption": None, "severity": 0,
         "adaptation": "none", "metric": "x", "value": float(i)} for i in range(300_000)]
try:
    ws.catalog.insert("metrics", rows)
except DiskFull as exc:
    print(exc.one_line())
    sys.exit(exc.exit_code)
"""


def test_a_bulk_catalog_insert_past_the_limit_rolls_back_with_a_disk_full_error(base: Path, tmp_path: Path):
    """300 000 metric rows: DuckDB writes the new blocks into the database file itself, past the limit."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    before = catalog_dump(ws)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BULK_INSERT, str(ws)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300, preexec_fn=limited(1_000_000))
    print(proc.stdout.strip())
    assert proc.returncode == DiskFull.exit_code, proc.stderr[-3000:]
    assert "disk full: could not write the catalog" in proc.stdout and "file too large" in proc.stdout
    assert_catalog_unchanged(before, ws)


# -- a real full file system (tmpfs) ----------------------------------------------------------------------------
@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted for the test (skipped unless root and mount works)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def resize(mnt: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(mnt)], check=True)


def test_a_full_file_system_fails_cleanly_and_the_rerun_finishes(base: Path, tmpfs: Path):
    ws = tmpfs / "ws"
    shutil.copytree(base, ws)
    used_kib = -(-shutil.disk_usage(tmpfs).used // 1024)
    resize(tmpfs, used_kib + 1024)  # 1 MiB free: less than the 1.8 MB of assignments
    before = catalog_dump(ws)
    args = list(CASES["cluster"].args)

    failed = cli(ws, args)
    print(f"tmpfs: {failed.stderr.strip()}")
    assert_clean_error(failed, "no space left on device")
    assert not (ws / CASES["cluster"].target).exists()
    assert_whole(ws)
    assert_catalog_unchanged(before, ws)

    resize(tmpfs, 256 * 1024)  # space freed
    done = cli(ws, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_content(ws / CASES["cluster"].target, ws / CASES["cluster"].same_as)
    assert not temp_files(ws)
