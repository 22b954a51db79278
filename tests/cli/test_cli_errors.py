"""Every user mistake gives one line on stderr and a non-zero exit code, never a traceback."""

import pytest
from PIL import Image

from core.store import Catalog


def assert_one_line_error(proc, code, fragment):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_init_and_version(cli, tmp_path):
    proc = cli("init")
    assert proc.returncode == 0 and "schema version" in proc.stdout
    assert cli("version").stdout.strip()


def test_unknown_source_kind(cli, tmp_path):
    proc = cli("datasets", "add", "x", "imagefolder", tmp_path)
    assert_one_line_error(proc, 2, "data source 'imagefolder' not found (did you mean 'image_folder'?)")


def test_missing_folder(cli, tmp_path):
    proc = cli("datasets", "add", "x", "image_folder", tmp_path / "nope")
    assert_one_line_error(proc, 3, "does not exist")


def test_bad_dataset_name(cli, tmp_path):
    proc = cli("datasets", "add", "<script>", "image_folder", tmp_path)
    assert_one_line_error(proc, 2, "invalid dataset name")


def test_bad_option_value(cli, tmp_path):
    proc = cli("datasets", "add", "x", "image_folder", tmp_path, "-o", "label_from=wrong")
    assert_one_line_error(proc, 2, "label_from")
    proc = cli("datasets", "add", "x", "image_folder", tmp_path, "-o", "nonsense")
    assert_one_line_error(proc, 2, "key=value")


def test_unknown_dataset_show(cli):
    cli("init")
    assert_one_line_error(cli("datasets", "show", "nope"), 2, "dataset 'nope' not found")


def test_empty_folder_is_an_error_not_a_traceback(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("datasets", "add", "e", "image_folder", tmp_path / "empty"), 3, "no readable samples")


def test_register_list_show_and_duplicate(cli, tmp_path):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 10, 10)).save(root / cls / f"{i}.png")
    (root / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    proc = cli("datasets", "add", "animals", "image_folder", root, "--role", "benchmark")
    assert proc.returncode == 0, proc.stderr
    assert "6 samples" in proc.stdout and "skipped 1" in proc.stdout
    listing = cli("datasets", "list").stdout
    assert "animals" in listing and "benchmark" in listing
    show = cli("datasets", "show", "animals").stdout
    assert "unsupported_image" in show or "corrupt_image" in show
    assert_one_line_error(cli("datasets", "add", "animals", "image_folder", root), 6, "already registered")
    assert cli("datasets", "add", "animals", "image_folder", root, "--replace").returncode == 0


def test_sql_read_only_and_bad_sql(cli):
    cli("init")
    ok = cli("sql", "SELECT count(*) AS n FROM datasets")
    assert ok.returncode == 0 and "n" in ok.stdout
    assert_one_line_error(cli("sql", "SELECT * FROM nope"), 2, "SQL failed")
    assert_one_line_error(cli("sql", "DELETE FROM datasets"), 2, "SQL failed")


def test_newer_schema_refused(cli, tmp_path):
    ws = tmp_path / "ws"
    cli("init", workspace=ws)
    Catalog(ws / "catalog.duckdb").execute("INSERT INTO schema_version VALUES (999, 'future', now())")
    assert_one_line_error(cli("datasets", "list", workspace=ws), 5, "newer than this prunescope")


def test_usage_error_exit_code(cli):
    proc = cli("datasets", "add")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("size", ["huge"])
def test_demo_unknown_size(cli, size):
    assert_one_line_error(cli("demo", "--size", size), 2, "unknown demo size")


def test_step_lists_keep_their_commas():
    from core.cli import _parse_step
    from core.errors import ConfigError

    assert _parse_step("similarity:benchmarks=val,v2,mode=near,count=5") == (
        "similarity", {"benchmarks": "val,v2", "mode": "near", "count": "5"})
    assert _parse_step("dbp:keep_fraction=0.5") == ("dbp", {"keep_fraction": "0.5"})
    with pytest.raises(ConfigError, match="not key=value"):
        _parse_step("dbp:0.5")


def test_jobs_commands_refuse_bad_stages_and_parameters(cli, tmp_path):
    assert cli("init").returncode == 0
    stages = cli("jobs", "stages")
    assert stages.returncode == 0 and "cluster" in stages.stdout and "eval-corruptions" in stages.stdout
    bad = cli("jobs", "submit", "clusterr")
    assert bad.returncode == 2 and "cluster" in bad.stderr
    bad = cli("jobs", "submit", "cluster", "-o", "embedding_set=nope", "-o", "k=0")
    assert bad.returncode == 2 and "\n" not in bad.stderr.strip()
    listed = cli("jobs", "list")
    assert listed.returncode == 0
    assert not list((tmp_path / "ws" / "runs").glob("*/params.json"))  # nothing was written
