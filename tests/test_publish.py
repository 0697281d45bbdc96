"""`zeropass publish DB DEST` never overwrites what is not its own, never nests datasets, and
finishes what a killed run left (issue 20). Real directories, the library called in-process."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from indexer.publish import PublishError, publish_dataset
from schemas.format import read_manifest
from schemas.layout import manifest_files
from tests.builders import build_synthetic


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("publish") / "db")


@pytest.fixture
def db(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "db"))


def parquet_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.parquet")}


@pytest.mark.parametrize("theirs", [["README.md"], ["README.md", "catalog.duckdb"], ["notes.txt"], ["vectors", "x.csv"]])
def test_a_non_empty_directory_that_is_not_a_dataset_is_refused_untouched(db, tmp_path, theirs):
    """It used to overwrite the user's README.md (and would have overwritten a catalog.duckdb)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    for name in theirs:
        (dest / name).mkdir() if name == "vectors" else (dest / name).write_text(f"the user's {name}")
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    with pytest.raises(PublishError, match="not empty and not a zeropass dataset"):
        publish_dataset(db, str(dest))
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in dest.iterdir()) == sorted(theirs)


def test_a_first_publish_killed_before_its_manifest_is_finished_by_a_rerun(db, tmp_path):
    """Its table directories, card and catalog are its own: the rerun is not refused as a stranger's."""
    dest = tmp_path / "dest"
    publish_dataset(db, str(dest))
    (dest / "manifest.json").unlink()  # killed just before the commit point
    publish_dataset(db, str(dest))
    assert (dest / "manifest.json").read_bytes() == (db / "manifest.json").read_bytes()


@pytest.mark.parametrize("where", ["dest-inside-db", "db-inside-dest"])
def test_a_dest_inside_db_or_the_reverse_is_refused(db, tmp_path, where):
    if where == "dest-inside-db":
        src, dest = db, db / "vectors" / "pub"
    else:
        src, dest = db, tmp_path
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(PublishError, match="one inside the other"):
        publish_dataset(src, str(dest))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_a_rerun_removes_what_a_publish_killed_after_its_manifest_left(db, tmp_path):
    """Killed between the manifest and the deletions: the old manifest is gone, and the old files
    used to stay forever (a rerun computed its deletions from DEST's manifest, the new one)."""
    from indexer.dataset import remove_model

    dest = tmp_path / "dest"
    publish_dataset(db, str(dest))
    beta = {f for f, owner in manifest_files(read_manifest(db)).items() if owner.name == "beta"}
    remove_model(db, "beta")
    # the killed publish: every new byte and the new manifest are in place, no deletion ran
    shutil.copy(db / "manifest.json", dest / "manifest.json")
    assert beta <= parquet_files(dest)
    plan = publish_dataset(db, str(dest), dry_run=True)
    assert set(plan.delete) == beta
    publish_dataset(db, str(dest))
    assert parquet_files(dest) == set(manifest_files(read_manifest(dest))) == parquet_files(db)
