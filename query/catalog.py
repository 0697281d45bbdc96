"""The catalog of a :class:`query.Dataset`: its manifest (untrusted input) and the DuckDB views
over the files it lists.

The connection is in-memory: one view per table (``schemas.TABLES``) over the Parquet files
that ``manifest.json`` lists, with absolute paths, so the dataset can sit anywhere. The
manifest's shape is checked and every listed path must stay inside the dataset (no absolute
paths, no ``..``, no symlink out). Opening reads no Parquet footer beyond the first file of each
view, so one damaged file does not stop the rest of the dataset; each file's sha256 is checked
against the manifest once per version of the file (``query.verify``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from schemas import TABLES
from schemas import layout
from schemas.format import OtherFormat, OtherVersion, check_version, first_line, links_out
from schemas.layout import MANIFEST, Owner, view_sql

from .connection import _quote
from .errors import BadManifest, NotADataset, SchemaMismatch, UnknownModel
from .units import quoted


def _failing_view_sql(table, rel: str) -> str:
    """A view with the table's columns whose every scan fails naming ``rel`` (a file it cannot open)."""
    from schemas import duckdb_type

    # error() in every column and in WHERE: no filter or projection the optimizer pushes in can
    # skip it (a constant NULL column would let `WHERE model = 'x'` fold the scan away).
    fail = f"error({_quote('zeropass-unreadable:' + rel)})"
    cols = ", ".join(f"CAST({fail} AS {duckdb_type(c.type)}) AS {c.name}" for c in table.columns)
    return f"SELECT {cols} FROM range(1) WHERE {fail} IS NULL"


# -- the manifest (untrusted input) ----------------------------------------------------------------

def _manifest_error(root: Path | str, why: str) -> BadManifest:
    return BadManifest(
        f"{root}/{MANIFEST} is malformed ({why}): it is not what zeropass writes; run `zeropass check --db {root}`, "
        f"or re-index the models into a new directory with `zeropass index MODEL --db NEWDIR`")


def validate_manifest(manifest: object, root: Path | str) -> dict[str, Owner]:
    """Check ``manifest`` (shape: ``schemas.layout.validate_manifest``, the writer's own check),
    its format and schema version, and that no listed file is a link out of ``root`` (a directory;
    a URL ``root`` has no links to follow).

    Returns {relative path: Owner(table, kind, name)} for every listed file. Raises BadManifest
    (or NotADataset, SchemaMismatch) with one line.
    """
    if isinstance(manifest, dict):
        try:
            check_version(manifest, f"dataset {root}")
        except OtherFormat as e:
            raise NotADataset(str(e)) from None
        except OtherVersion as e:
            raise SchemaMismatch(str(e)) from None
    try:
        layout.validate_manifest(manifest, f"{root}/{MANIFEST}")
    except layout.BadManifest as e:
        raise _manifest_error(root, e.why) from None
    owners = layout.manifest_files(manifest)
    if not isinstance(root, Path):
        return owners
    for rel, real in links_out(root, owners)[:1]:
        raise _manifest_error(root, f"{rel} is a link to {real}, outside the dataset")
    return owners


class Catalog:
    """The manifest and views half of a Dataset (a mixin; see ``query.connection.Connection``)."""

    def _read_manifest(self) -> None:
        if self._remote is not None:
            text = self._remote.manifest_text()
            manifest = self._parse_manifest(text, f"{self.root}/{MANIFEST}")
            self._owners = validate_manifest(manifest, self.root)
            self._remote.use(manifest, self._owners)
            self.manifest = manifest
            self._signature = self._remote.revision
            return
        path = self.root / MANIFEST
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise NotADataset(
                f"{self.root} is not a zeropass dataset (no {MANIFEST}): build one with `zeropass index MODEL --db {self._given}`") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BadManifest(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): check the file, or run `zeropass check --db {self.root}`") from None
        manifest = self._parse_manifest(text, path)
        self._owners = validate_manifest(manifest, self.root)
        # each file against its listed sha256, once per version of the file (query.verify): a damaged
        # one is then treated as unreadable, so the views name it and every other file still answers
        self._corrupt = self._verifier.damaged(layout.file_info(manifest), self._owners)
        self.manifest = manifest
        self._signature = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _parse_manifest(self, text: str, path) -> object:
        try:
            return json.loads(text)
        except ValueError:
            if self._remote is not None:
                raise NotADataset(f"{self.root} is not a zeropass dataset ({path} is not JSON): check the URL") from None
            raise BadManifest(f"{path} is not valid JSON (the manifest): run `zeropass check --db {self.root}`, "
                              f"or rebuild the dataset with `zeropass index MODEL --db {self._given}`") from None

    def _path(self, rel: str) -> str:
        """The path DuckDB opens for the listed file ``rel`` (a local path, or ``zeropass://rel``)."""
        return self._remote.path(rel) if self._remote is not None else str(self.root / rel)

    def _exists(self, rel: str) -> bool:
        # Remote: a listed file is taken to exist (one request per file would cost more than opening);
        # a missing one fails when read, naming it.
        return True if self._remote is not None else os.path.exists(self.root / rel)

    # -- views ------------------------------------------------------------------------------------

    def _files(self, table: str, models, layers, compacted: bool = True) -> layout.Sources:
        """What a view of ``table`` restricted to ``models`` and ``layers`` reads (manifest-driven)."""
        src = layout.table_sources(self.manifest, table, models,
                                   use_compacted=compacted and table not in self._no_compacted)
        if layers is not None and "layer" in TABLES[table].partition_by:
            wanted = {f"layer={int(layer)}" for layer in layers}
            src = src._replace(files=[f for f in src.files if wanted & set(f.split("/"))])
        return src

    def _build_views(self) -> None:
        self._unreadable.clear()
        self._no_compacted.clear()
        for name in TABLES:
            self._create_view(name, name, None, None)
        for (table, models, layers, compacted), name in self._sources.items():
            self._create_view(name, table, models and list(models), layers, compacted)

    def _create_view(self, name: str, table: str, models, layers, compacted: bool = True) -> None:
        """A view of ``table`` (``models``, ``layers``) that opens no file but those it binds columns from.

        Compacted rows come first. A compacted file that is missing or cannot be bound is not
        used: every view of the table then reads the per-model files it was built from (they
        stay listed), and `zeropass check` names it. Per-model files: a missing file makes the
        view an error naming it (DuckDB checks every path at bind); an unreadable file is
        skipped as the binding file, and stays listed, so a query that reaches it fails naming
        it while the view itself still exists.
        """
        src = self._files(table, models, layers, compacted)
        head = None
        if src.compacted:
            head = layout.sources_sql(TABLES[table], src._replace(files=[], compacted=[self._path(f) for f in src.compacted]),
                                      None, union_by_name=False,
                                      layers=layers if "layer" in TABLES[table].partition_by else None)
            try:
                if not all(self._exists(f) for f in src.compacted):
                    raise duckdb.IOException(f"compacted file missing: {src.compacted}")
                if any(f in self._corrupt for f in src.compacted):
                    raise duckdb.IOException(f"compacted file damaged: {src.compacted}")
                self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {head}")
            except duckdb.Error as e:
                self._raise_remote_failure()
                for f in src.compacted:
                    self._unreadable.setdefault(f, self._corrupt.get(f) or first_line(e))
                self._no_compacted.add(table)
                return self._create_view(name, table, models, layers, compacted)
        files = src.files
        missing = [f for f in files if f in self._corrupt or not self._exists(f)]
        order = [f for f in files if f not in missing]
        sql = None
        while order and not missing:
            candidate = view_sql(TABLES[table], [self._path(f) for f in order], None, union_by_name=False)
            try:
                self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {candidate}")
                sql = candidate
                break
            except duckdb.Error as e:
                self._raise_remote_failure()
                bad = self._listed_file_in(str(e), order)
                if bad is None or bad in self._unreadable:
                    raise self._translate(e, None) from None
                self._unreadable[bad] = first_line(e)
                if all(f in self._unreadable for f in order):
                    missing = [bad]
                order = [f for f in order if f != bad] + [bad]
        if missing:
            sql = _failing_view_sql(TABLES[table], missing[0])
        elif sql is not None and head is None:
            return  # the view bound above is the view
        elif sql is None and head is None:
            sql = view_sql(TABLES[table], [], self.root)
        if head is not None:
            sql = head if sql is None else f"{head} UNION ALL {sql}"
        try:
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        except duckdb.Error as e:  # a file deleted since it bound above (a re-index publishing now)
            raise self._translate(e, self._listed_file_in(str(e))) from None

    def _raise_remote_failure(self) -> None:
        """A failed remote read that is not the file's fault (deadline, network, Ctrl-C) stops here:
        taking the file for damaged would hide it until a query read it."""
        err = self._remote.failure() if self._remote is not None else None
        if err is not None:
            raise err

    def source(self, table: str, models: list[str] | None = None, layers: list[int] | None = None,
               compacted: bool = True) -> str:
        """Name of a view of ``table`` restricted to the files of ``models`` (and ``layers``).

        The same rows as the view with those filters, but DuckDB opens only the files that can
        hold them (binding a scan over every file of a big dataset costs tens of milliseconds),
        and a damaged file of another model is never touched. Paths come from the manifest,
        never from the user; the view follows the manifest when a model is re-indexed.

        ``compacted=False``: the models' own files even where a compacted copy holds them (the
        same rows). For scans of one model by many tokens: its own ``vectors_by_token`` file is
        sorted by token within the model, the compacted one by token across all models, where
        150 tokens touch most row groups of the file.
        """
        layer_key = tuple(sorted({int(x) for x in layers})) if layers is not None and "layer" in TABLES[table].partition_by else None
        key = (table, tuple(models) if models is not None else None, layer_key, bool(compacted))
        with self._lock, self._catalog_lock:
            name = self._sources.get(key)
            if name is None:
                name = f"_zeropass.src{len(self._sources)}_{table}"
                self._create_view(name, table, list(models) if models is not None else None, layer_key, bool(compacted))
                self._sources[key] = name
        return name

    def _refresh(self, force: bool = False) -> None:
        """Re-read the manifest and rebuild the views if it changed (a stat, before each query).

        A remote manifest is fetched again only when forced (after a read failed): a request
        before every query would cost more than most queries.
        """
        if self._remote is not None:
            self._remote.last_error = None  # each attempt starts clean: an old failed read must not name this one's error
            if force:
                # after a failed read: a new revision, or the same one after a network error; views
                # that failed to bind are bound again (footers come from the caches)
                with self._catalog_lock:
                    self._read_manifest()
                    self._remote.file_errors.clear()
                    self._build_views()
            return
        try:
            st = os.stat(self.root / MANIFEST)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        if sig == self._signature and not force:
            return
        with self._catalog_lock:
            self._read_manifest()
            self._build_views()

    # -- models -----------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self.manifest.get("models", {}))

    def resolve_models(self, model: str | list[str] | tuple[str, ...] | None) -> list[str]:
        """Slugs selected by ``model`` (None or empty list: all; a slug, a comma list or a list of either).

        Names given but naming nothing (``""``, ``",,"``) are refused rather than read as "all".
        """
        names = self.model_names()
        if model is None or model == () or model == []:
            if not names:
                raise UnknownModel(f"dataset {self.root} holds no models yet: add one with `zeropass index MODEL --db {self.root}`")
            return names
        wanted = [model] if isinstance(model, str) else list(model)
        out: list[str] = []
        for item in wanted:
            for slug in (s.strip() for s in str(item).split(",")):
                if not slug:
                    continue
                if slug not in names:
                    have = ", ".join(names) if names else "none"
                    raise UnknownModel(f"unknown model {quoted(slug)}: indexed models are {have}")
                if slug not in out:
                    out.append(slug)
        if not out:
            have = ", ".join(names) if names else "none"
            raise UnknownModel(f"no model named in {quoted(model if isinstance(model, str) else ','.join(map(str, model)))}: "
                               f"give one of {have}")
        return out

    def resolve_model(self, model: str, what: str = "MODEL") -> str:
        """The one slug ``model`` names (for helpers about one model: ``show``, ``similar``)."""
        if not isinstance(model, str):
            raise UnknownModel(f"{what} must be one model name, got {model!r}")
        slugs = self.resolve_models(model)
        if len(slugs) != 1:
            raise UnknownModel(f"{what} {quoted(model)} names {len(slugs)} models ({', '.join(slugs)}): give one")
        return slugs[0]

    def model_info(self, model: str) -> dict:
        """The ``models`` row of one model, as a dict."""
        slug = self.resolve_model(model)
        rows = self.rows("SELECT * FROM models WHERE model = $m", {"m": slug})
        if not rows:
            raise UnknownModel(f"model {slug!r} is in the manifest but has no models row: re-index it")
        return rows[0]
