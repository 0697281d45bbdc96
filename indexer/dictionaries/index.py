"""`zeropass index-sae`: dictionaries -> projections -> the dataset, beside the model they belong to.

A dictionary belongs to a model already in the dataset: its decoder rows are scored through the
model's W_U and its encoder directions through W_E, exactly as the model's own write- and read-side
vectors (``indexer.kernels.vectors.Projector``), so the model is loaded again from the source its
manifest entry records (or ``model_source``) and checked against the recorded weight digests.

Rows go to ``vectors`` (kinds decoder / encoder, ``dictionary`` set) and ``vectors_by_token``;
per-dictionary tables ``dictionaries``, ``feature_stats`` and ``feature_neighbours`` beside them.
Everything of one call is published in one commit (``indexer.dataset.commit``): readers see all
of its dictionaries or none. docs/DICTIONARIES.md has the conventions.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from schemas import SCHEMA_VERSION, TABLES
from schemas.layout import DICTIONARIES, partition_dir
from schemas.units import DICTIONARY_NAME, feature_unit, neuron_unit

from ..build import BadOption, Progress, _whole, stderr_progress
from schemas.format import file_digest

from ..dataset import (ZEROPASS_VERSION, check_writable, commit, conform, dataset_lock, open_dataset, sort_by_token,
                       write_parquet_atomic, zeropass_command)
from ..errors import NameTaken, ZeropassError
from ..kernels.vectors import Projector, TopK
from . import SITES, BadDictionary, Dictionary, find_dictionaries, open_dictionary

# Features projected per block: bounds memory by a [block, d_in] slice of the weights and the
# projector's own score buffer, whatever d_sae is (a 1M-feature dictionary is read 4096 rows at a time).
BLOCK = 4096
# Decoder directions held at once while neighbours are sought (a chunk of features, float32).
_CHUNK_BYTES = 256 * 2**20


class UnknownModel(ZeropassError, LookupError):
    """The dictionary's --model is not a model of the dataset."""


@dataclass
class _Job:
    name: str
    d: Dictionary
    origin: str


def index_dictionaries(ref: str, db: str | Path, *, model: str, name: Optional[str] = None, k: Optional[int] = None,
                       n_neighbours: int = 10, neighbours: tuple[str, ...] = ("ff_value", "decoder"),
                       model_source: Optional[str] = None, layer: Optional[int] = None, site: Optional[str] = None,
                       allow_pickle: bool = False, replace: bool = False,
                       progress: Optional[Progress] = stderr_progress) -> list[dict]:
    """Index the dictionary (or every dictionary of the folder) ``ref`` against ``model`` of ``db``.

    ``ref``: a folder, a ``params.npz`` file, or a hub id with its subfolder ``org/repo/sub/folder``.
    Returns the manifest entries, each with its ``dictionary`` name. ``k`` (tokens per side)
    defaults to the model's own, so that `similar` weighs a feature's lists like the model's.

    >>> index_dictionaries("gpt2-res-jb/blocks.8.hook_resid_pre", "zeropass-db", model="gpt2", name="res-L8")  # doctest: +SKIP
    """
    say = progress or (lambda _m: None)
    _check_options(50 if k is None else k, n_neighbours, neighbours, site)
    root = Path(db)
    if not (root / "manifest.json").is_file():  # a dictionary needs its model: never create a dataset here
        raise UnknownModel(f"{root} holds no dataset: index model {model!r} first with "
                           f"`{zeropass_command('index', 'MODEL', '--name', model, '--db', root)}`")
    check_writable(root)
    manifest = open_dataset(root) or {"models": {}}
    entry = manifest["models"].get(model)
    if entry is None:
        have = ", ".join(sorted(manifest["models"])) or "none"
        raise UnknownModel(f"model {model!r} is not in {root} (models: {have}): index it first with "
                           f"`{zeropass_command('index', 'MODEL', '--name', model, '--db', root)}`")
    if entry.get("variant") == "diff":
        raise BadOption(f"model {model!r} is a fine-tuning delta (variant diff): index the dictionary against the tuned model")
    if k is None:  # the model's own, so that `similar` weighs a feature's lists like the model's
        k = int(_model_row(root, entry).get("k") or 50)
    path, revision = _resolve(ref)
    jobs = _jobs(path, ref, name, manifest, allow_pickle=allow_pickle, layer=layer, site=site, replace=replace)
    row = _model_row(root, entry)
    for job in jobs:  # from the recorded dimensions: refused before the model is loaded
        _check_fits(job, row)
    source = model_source or entry.get("origin") or entry.get("source")
    canonical, token_text = _load_model(root, manifest, model, entry, row, source, say)
    dims = canonical.dims
    writer = _Writer(root, model, canonical, token_text, k=min(k, dims.d_vocab), say=say)
    t0 = time.perf_counter()
    done = []
    with dataset_lock(root):
        for job in jobs:
            done.append(writer.project(job))
        for job, part in zip(jobs, done):
            part["neighbours"] = writer.neighbours(job, jobs, n_neighbours, neighbours)
        entries = {}
        for job, part in zip(jobs, done):
            entries[job.name] = writer.write(job, part, revision=revision, source=str(ref), n_neighbours=n_neighbours,
                                             neighbours=neighbours, model_source=source)

        def change(m: dict) -> list[str]:
            if model not in m["models"]:  # removed meanwhile: nothing to attach the dictionaries to
                raise UnknownModel(f"model {model!r} was removed from {root} while its dictionaries were indexed")
            section = m.setdefault(DICTIONARIES, {})
            for job in jobs:  # another writer may have taken a name since _jobs looked
                taken = section.get(job.name)
                if taken and taken.get("origin") != job.origin and not replace:
                    raise NameTaken(f"a dictionary named {job.name!r} indexed from {taken.get('origin')} was added to "
                                    f"{root} meanwhile: choose another name with --name NAME, or replace it with --replace")
            old = [f for n in entries if n in section for fs in section[n].get("files", {}).values() for f in fs]
            section.update(entries)
            return old

        commit(root, change)
    say(f"[{model}] {len(jobs)} dictionar{'y' if len(jobs) == 1 else 'ies'} indexed in {time.perf_counter() - t0:.1f}s: "
        + ", ".join(job.name for job in jobs))
    return [dict(entries[j.name], dictionary=j.name) for j in jobs]


def _check_options(k, n_neighbours, neighbours, site) -> None:
    if not _whole(k) or not 1 <= k <= 2**31 - 1:
        raise BadOption(f"--k {k} must be a whole number from 1 to {2**31 - 1}")
    if not _whole(n_neighbours) or not 0 <= n_neighbours <= 10_000:
        raise BadOption(f"--neighbours {n_neighbours} must be a whole number from 0 (none) to 10000")
    bad = [s for s in neighbours if s not in ("ff_value", "decoder")]
    if bad:
        raise BadOption(f"--neighbour-scope {','.join(bad)} is unknown: use ff_value, decoder or both")
    if site is not None and site not in SITES:
        raise BadOption(f"--site {site!r} is unknown: use one of {', '.join(SITES)}")


_HUB_SUB = re.compile(r"^([A-Za-z0-9][\w.-]*)/([\w.-]+)((?:/[\w.-]+)+)$")


def _resolve(ref: str) -> tuple[Path, Optional[str]]:
    """A local path as it is; ``org/repo/sub/folder`` fetched (only that subfolder) from the hub."""
    p = Path(ref)
    if p.exists():
        return p, None
    m = _HUB_SUB.match(str(ref))
    if not m:
        from . import NoDictionary

        raise NoDictionary(f"{ref} does not exist: give a dictionary folder, a folder of them, a params.npz file "
                           f"or a hub id with its subfolder (org/repo/sub/folder)")
    from ..load import _SNAPSHOT, require

    hub = require("huggingface_hub", why=f"downloading {ref!r} from the hub")
    repo, sub = f"{m.group(1)}/{m.group(2)}", m.group(3).strip("/")
    try:
        local = Path(hub.snapshot_download(repo_id=repo, allow_patterns=[f"{sub}/*"]))
    except Exception as e:
        from . import NoDictionary

        raise NoDictionary(f"{ref!r} is not a local path and {repo} could not be fetched from the hub "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    rev = _SNAPSHOT.search(str(local))
    return local / sub, rev.group(1) if rev else None


def _jobs(path: Path, ref: str, name: Optional[str], manifest: dict, *, allow_pickle, layer, site, replace) -> list[_Job]:
    folders = find_dictionaries(path)
    jobs = []
    for folder in folders:
        d = open_dictionary(folder, allow_pickle=allow_pickle, layer=layer, site=site)
        if len(folders) == 1:
            n = name or f"{d.site}-L{d.layer}"
        else:  # a release: each dictionary named by its path inside the folder
            rel = folder.relative_to(path).as_posix() if folder != path else folder.name
            n = re.sub(r"[^A-Za-z0-9_-]+", "-", rel).strip("-_")
            n = f"{name}-{n}" if name else n
        if not DICTIONARY_NAME.fullmatch(n):
            raise BadOption(f"dictionary name {n!r} is not valid: use letters, digits, '-' or '_' (no dots, ASCII, "
                            f"starting with a letter or digit, at most 64), e.g. --name res-L8")
        origin = str(folder.resolve()) if Path(ref).exists() else f"{ref}" + ("" if len(folders) == 1 else f"#{n}")
        old = manifest.get(DICTIONARIES, {}).get(n)
        if old and old.get("origin") != origin and not replace:
            raise NameTaken(f"a dictionary named {n!r} indexed from {old.get('origin')} is already in the dataset, and "
                            f"{origin} is another source: choose another name with --name NAME, or replace it with --replace")
        if any(j.name == n for j in jobs):
            raise NameTaken(f"two dictionaries of {ref} would both be named {n!r}: index them one at a time with --name")
        jobs.append(_Job(n, d, origin))
    return jobs


def _load_model(root: Path, manifest: dict, slug: str, entry: dict, row: dict, source: str, say: Progress):
    """The model's canonical weights (its recorded variant applied) and its vocabulary's token texts."""
    from ..load import load_canonical
    from ..variants import fold

    t = time.perf_counter()
    try:
        loaded = load_canonical(source, quiet=True)
    except ZeropassError as e:
        raise type(e)(f"model {slug!r} (recorded source {source}) cannot be loaded: {e}; "
                      f"point to its weights with --model-source PATH") from None
    recorded = json.loads(row.get("weights_sha256") or "{}")
    if recorded and dict(loaded.provenance.weights_sha256) != recorded:
        raise BadOption(f"the weights at {source} are not those model {slug!r} was indexed from (their sha256 differ): "
                        f"give the original checkpoint with --model-source PATH")
    canonical = fold(loaded.canonical) if entry.get("variant") == "folded" else loaded.canonical
    say(f"loaded {source} for {slug} in {time.perf_counter() - t:.1f}s")
    vocab = manifest["vocabularies"][entry["vocab_id"]]
    tokens = pa.concat_tables([pq.read_table(root / f, columns=["token_id", "token"]) for f in vocab["files"]])
    tokens = tokens.sort_by("token_id")
    return canonical, tokens.column("token").combine_chunks()


def _model_row(root: Path, entry: dict) -> dict:
    files = entry.get("files", {}).get("models", [])
    rows = pq.read_table(root / files[0]).to_pylist() if files else []
    return rows[0] if rows else {}


def _check_fits(job: _Job, row: dict) -> None:
    """Refuse a dictionary that does not fit the model's ``models`` row (width, layer)."""
    d = job.d
    want = row["n_heads"] * row["d_head"] if d.site == "z" else row["d_model"]
    what = "n_heads x d_head" if d.site == "z" else "d_model"
    if d.d_in != want:
        raise BadDictionary(f"dictionary {job.name} ({d.path}) reads vectors of width {d.d_in}, but the model's {what} "
                            f"is {want}: it was trained on another model (or another hook)")
    if not 0 <= d.layer < row["n_layers"]:
        raise BadDictionary(f"dictionary {job.name} ({d.path}) is at layer {d.layer}, but the model has layers "
                            f"0-{row['n_layers'] - 1}")


def _finite(t: torch.Tensor, job: _Job, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise BadDictionary(f"dictionary {job.name} ({job.d.path}): {what} holds NaN or Inf values: "
                            f"the file is damaged, re-download it")
    return t


class _Writer:
    """Projects dictionaries of one model and writes their files (the commit is the caller's)."""

    def __init__(self, root: Path, slug: str, model, token_text: pa.Array, *, k: int, say: Progress):
        self.root, self.slug, self.model, self.token_text, self.k, self.say = root, slug, model, token_text, k, say
        emb = model.embeddings
        same = emb.W_U.shape == emb.W_E.T.shape and torch.equal(emb.W_U, emb.W_E.T)
        self.read = Projector(emb.W_E.T, k)  # scores = W_E @ r, as for the model's own read side
        self.write_side = self.read if same else Projector(emb.W_U, k)  # scores = w @ W_U
        self.build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self._z_layer: tuple[int, object] | None = None  # the layer whose W_O / W_V a z dictionary needs

    def _attention(self, l: int):
        """Layer ``l``'s weights for z dictionaries (kept while consecutive dictionaries share the layer)."""
        if self._z_layer is None or self._z_layer[0] != l:
            self._z_layer = (l, self.model.layer(l))
        return self._z_layer[1]

    def write_direction(self, job: _Job, dec: torch.Tensor) -> torch.Tensor:
        """Decoder rows as residual-stream directions. ``z`` dictionaries write the heads' concatenated
        values: a decoder row writes sum_h dec_h @ W_O[h]. Every other site is residual space already."""
        if job.d.site != "z":
            return dec
        dims = self.model.dims
        W_O = self._attention(job.d.layer).W_O.float()  # [n_heads, d_head, d_model]
        return torch.einsum("nhd,hdm->nm", dec.reshape(dec.shape[0], dims.n_heads, dims.d_head), W_O)

    def read_direction(self, job: _Job, enc: torch.Tensor) -> torch.Tensor:
        """Encoder directions in the residual stream. A ``z`` encoder reads the values: its residual
        direction is sum_h W_V[kv(h)] @ enc_h (query head h reads value head kv(h))."""
        if job.d.site != "z":
            return enc
        dims = self.model.dims
        W_V = self._attention(job.d.layer).W_V.float()[[dims.kv_head(h) for h in range(dims.n_heads)]]
        return torch.einsum("nhd,hmd->nm", enc.reshape(enc.shape[0], dims.n_heads, dims.d_head), W_V)

    def project(self, job: _Job) -> dict:
        d = job.d
        t = time.perf_counter()
        parts = []
        dec_norm, enc_norm = [], []
        for a in range(0, d.d_sae, BLOCK):
            b = min(d.d_sae, a + BLOCK)
            dec = _finite(d.decoder(a, b), job, f"W_dec rows {a}-{b - 1}")
            enc = _finite(d.encoder(a, b), job, f"encoder directions {a}-{b - 1}")
            dec_norm.append(dec.double().norm(dim=1))
            enc_norm.append(enc.double().norm(dim=1))
            idx = np.arange(a, b)
            parts.append(self._table(job, "decoder", idx, self.write_side(self.write_direction(job, dec))))
            parts.append(self._table(job, "encoder", idx, self.read(self.read_direction(job, enc))))
        stats = {"decoder_norm": torch.cat(dec_norm).numpy(), "encoder_norm": torch.cat(enc_norm).numpy()}
        for name in ("b_enc", "threshold"):
            v = d.vector(name)
            if v is not None:
                v = _finite(v.reshape(-1), job, name)
                if v.numel() != d.d_sae:
                    raise BadDictionary(f"dictionary {job.name}: {name} has {v.numel()} values for {d.d_sae} features")
                stats[name] = v.double().numpy()
        self.say(f"[{self.slug}] {job.name}: {d.describe()} projected in {time.perf_counter() - t:.1f}s")
        return {"vectors": pa.concat_tables(parts), "stats": stats}

    def _table(self, job: _Job, kind: str, idx: np.ndarray, topk: TopK) -> pa.Table:
        n, k = topk.top_idx.shape
        total = n * 2 * k
        unit_of_row = np.repeat(np.arange(n), 2 * k)
        token_ids = np.concatenate([topk.top_idx.numpy(), topk.bot_idx.numpy()], axis=1).reshape(-1).astype(np.int32)
        scores = np.concatenate([topk.top_val.numpy(), topk.bot_val.numpy()], axis=1).reshape(-1)
        zeros = pa.array(np.zeros(total, dtype=np.int32))
        return pa.table({
            "model": pa.DictionaryArray.from_arrays(zeros, pa.array([self.slug])),
            "layer": pa.array(np.full(total, job.d.layer, dtype=np.int16)),
            "kind": pa.DictionaryArray.from_arrays(zeros, pa.array([kind])),
            "head": pa.nulls(total, pa.int16()),
            "expert": pa.nulls(total, pa.int16()),
            "dictionary": pa.DictionaryArray.from_arrays(zeros, pa.array([job.name])),
            "idx": pa.array(idx.astype(np.int32)[unit_of_row]),
            "unit": pa.DictionaryArray.from_arrays(pa.array(unit_of_row.astype(np.int32)),
                                                   pa.array([feature_unit(job.name, int(i)) for i in idx])),
            "side": pa.DictionaryArray.from_arrays(pa.array(np.tile(np.repeat(np.array([0, 1], dtype=np.int32), k), n)),
                                                   pa.array(["top", "bottom"])),
            "rank": pa.array(np.tile(np.tile(np.arange(1, k + 1, dtype=np.int32), 2), n)),
            "token_id": pa.array(token_ids),
            "token": pa.DictionaryArray.from_arrays(pa.array(token_ids), self.token_text),
            "score": pa.array(scores.astype(np.float32)),
        })

    def neighbours(self, job: _Job, jobs: list[_Job], n: int, scope: tuple[str, ...]) -> pa.Table:
        """Top-``n`` cosines of each decoder direction among the FF values of layers <= its layer and the
        decoder directions of the other dictionaries of this call (``jobs``) at layers <= its layer.

        Candidates are picked by float32 GEMMs, ``n + 8`` per feature, then their cosines are recomputed
        in float64 and re-ranked, ties by the lower candidate (FF values by layer and neuron, then
        features). Memory: one chunk of the feature's directions, one candidate group (a layer's FF
        values or a block of another dictionary's decoder) and the chunk's candidates at a time."""
        rows = {c: [] for c in ("feature", "rank", "neighbour", "neighbour_kind", "neighbour_layer", "cosine")}
        groups = self._candidate_groups(job, jobs, scope)
        if n == 0 or not groups or job.d.d_sae == 0:
            return self._neighbour_table(job, rows)
        d_model = self.model.dims.d_model
        chunk = max(BLOCK, (_CHUNK_BYTES // (4 * d_model)) // BLOCK * BLOCK)
        for c0 in range(0, job.d.d_sae, chunk):
            c1 = min(job.d.d_sae, c0 + chunk)
            X = torch.cat([self._decoder_directions(job, a, min(c1, a + BLOCK)) for a in range(c0, c1, BLOCK)])
            Xn = torch.nn.functional.normalize(X, dim=1)
            starts = range(0, c1 - c0, BLOCK)
            best_v = {a: torch.zeros((min(BLOCK, c1 - c0 - a), 0)) for a in starts}  # per block of features
            best_i = {a: torch.zeros((min(BLOCK, c1 - c0 - a), 0), dtype=torch.int64) for a in starts}
            offset = 0
            offsets = []
            for g, (_, _, _, load) in enumerate(groups):
                C = torch.nn.functional.normalize(load(), dim=1)
                offsets.append(offset)
                for a in starts:
                    s = Xn[a:a + BLOCK] @ C.T
                    top = torch.topk(s, min(n + 8, s.shape[1]), dim=1)
                    v = torch.cat([best_v[a], top.values], dim=1)
                    i = torch.cat([best_i[a], top.indices + offset], dim=1)
                    keep = torch.topk(v, min(n + 8, v.shape[1]), dim=1)
                    best_v[a], best_i[a] = keep.values, i.gather(1, keep.indices)
                offset += C.shape[0]
            del C
            best_i = torch.cat([best_i[a] for a in starts])
            # exact re-ranking: the chosen candidates' cosines in float64, group by group
            ids = best_i.sort(dim=1).values  # ascending ids: the stable sort below breaks ties by the lower one
            Xd = X.double()
            Xd = Xd / Xd.norm(dim=1, keepdim=True).clamp_min(1e-300)
            cos = torch.zeros(ids.shape, dtype=torch.float64)
            bounds = offsets + [offset]
            for g, (_, _, _, load) in enumerate(groups):
                r, j = ((ids >= bounds[g]) & (ids < bounds[g + 1])).nonzero(as_tuple=True)
                if len(r):
                    vec = load()[ids[r, j] - bounds[g]].double()
                    cos[r, j] = (vec * Xd[r]).sum(dim=1) / vec.norm(dim=1).clamp_min(1e-300)
            order = torch.sort(cos, dim=1, descending=True, stable=True).indices[:, :n]
            cos, ids = cos.gather(1, order).numpy(), ids.gather(1, order).numpy()
            which = (np.searchsorted(np.asarray(bounds), ids, side="right") - 1).ravel()
            local = (ids.ravel() - np.asarray(bounds)[which]).tolist()
            R, m = ids.shape
            rows["feature"].extend((c0 + np.repeat(np.arange(R), m)).tolist())
            rows["rank"].extend(np.tile(np.arange(1, m + 1), R).tolist())
            rows["neighbour"].extend(groups[g][2](i) for g, i in zip(which.tolist(), local))
            rows["neighbour_kind"].extend(groups[g][0] for g in which.tolist())
            rows["neighbour_layer"].extend(groups[g][1] for g in which.tolist())
            rows["cosine"].extend(cos.ravel().tolist())
        return self._neighbour_table(job, rows)

    def _decoder_directions(self, job: _Job, a: int, b: int) -> torch.Tensor:
        return self.write_direction(job, job.d.decoder(a, b)).float()

    def _candidate_groups(self, job: _Job, jobs: list[_Job], scope: tuple[str, ...]) -> list[tuple]:
        """(kind, layer, unit of the i-th row, loader of the rows [m, d_model]) per candidate group, in tie order."""
        groups = []
        if "ff_value" in scope:
            for l in range(job.d.layer + 1):
                groups.append(("ff_value", l, lambda i, l=l: neuron_unit(l, i), lambda l=l: self.model.layer(l).W_out.float()))
        if "decoder" in scope:
            for other in jobs:
                if other.name != job.name and other.d.layer <= job.d.layer:
                    for a in range(0, other.d.d_sae, BLOCK):
                        b = min(other.d.d_sae, a + BLOCK)
                        groups.append(("decoder", other.d.layer, lambda i, o=other.name, a=a: feature_unit(o, a + i),
                                       lambda o=other, a=a, b=b: self._decoder_directions(o, a, b)))
        return groups

    def _neighbour_table(self, job: _Job, rows: dict) -> pa.Table:
        n = len(rows["feature"])
        return pa.table({
            "model": [self.slug] * n, "dictionary": [job.name] * n,
            "layer": pa.array(np.full(n, job.d.layer, dtype=np.int16)),
            "feature": pa.array(rows["feature"], pa.int32()),
            "unit": [feature_unit(job.name, f) for f in rows["feature"]],
            "rank": pa.array(rows["rank"], pa.int32()),
            "neighbour": pa.array(rows["neighbour"], pa.string()),
            "neighbour_kind": pa.array(rows["neighbour_kind"], pa.string()),
            "neighbour_layer": pa.array(rows["neighbour_layer"], pa.int16()),
            "cosine": pa.array(rows["cosine"], pa.float64()),
        })

    def write(self, job: _Job, part: dict, *, revision, source: str, n_neighbours: int, neighbours, model_source) -> dict:
        """Write one dictionary's files; returns its manifest entry (published by the caller)."""
        d, name = job.d, job.name
        files: dict[str, list[str]] = {}
        info: dict[str, dict] = {}

        def put(table: str, data: pa.Table, **keys) -> str:
            rel = f"{partition_dir(table, model=self.slug, **keys)}/{self.build_id}.parquet"
            if table == "vectors":  # as a model's vectors: sorted by token, small row groups (indexer.dataset)
                digest = write_parquet_atomic(self.root, rel, conform(table, data.sort_by("token_id")), row_group_size=16 * 1024)
            else:
                digest = write_parquet_atomic(self.root, rel, conform(table, data))
            files.setdefault(table, []).append(rel)
            info[rel] = dict(digest, rows=data.num_rows)
            return rel

        vec = put("vectors", part["vectors"], layer=d.layer, dictionary=name)
        rel = f"{partition_dir('vectors_by_token', model=self.slug, dictionary=name)}/{self.build_id}.parquet"
        rows, digest = sort_by_token(self.root, f"{self.slug}.{name}", [vec], rel)
        files["vectors_by_token"] = [rel]
        info[rel] = dict(digest, rows=rows)
        stats = part["stats"]
        idx = np.arange(d.d_sae)
        put("feature_stats", pa.table({
            "model": [self.slug] * d.d_sae, "dictionary": [name] * d.d_sae,
            "layer": pa.array(np.full(d.d_sae, d.layer, dtype=np.int16)), "feature": pa.array(idx.astype(np.int32)),
            "unit": [feature_unit(name, int(i)) for i in idx],
            "decoder_norm": stats["decoder_norm"], "encoder_norm": stats["encoder_norm"],
            "b_enc": stats.get("b_enc", pa.nulls(d.d_sae, pa.float64())),
            "threshold": stats.get("threshold", pa.nulls(d.d_sae, pa.float64())),
        }), dictionary=name)
        put("feature_neighbours", part["neighbours"], dictionary=name)
        weights = {p.name: file_digest(p)["sha256"] for p in d.files}
        settings = {"config": d.config, "neighbour_scope": list(neighbours),
                    "model_source": model_source, "weights_sha256": weights, "path": str(d.path)}
        created = datetime.now(timezone.utc).replace(microsecond=0)
        put("dictionaries", pa.Table.from_pylist([{
            "model": self.slug, "dictionary": name, "layer": d.layer, "site": d.site, "hook": d.hook,
            "d_in": d.d_in, "d_sae": d.d_sae, "architecture": d.architecture, "format": d.format, "source": source,
            "revision": revision, "k": self.k, "n_neighbours": n_neighbours,
            "settings": json.dumps(settings, sort_keys=True, default=str), "zeropass_version": ZEROPASS_VERSION,
            "created_at": created}], schema=TABLES["dictionaries"].schema), dictionary=name)
        return {
            "model": self.slug, "build_id": self.build_id, "origin": job.origin, "source": source,
            "files": {t: sorted(f) for t, f in sorted(files.items())},
            "file_info": dict(sorted(info.items())),
            "row_counts": {t: sum(info[f]["rows"] for f in fs) for t, fs in sorted(files.items())},
            "committed_at": created.isoformat(), "schema_version": SCHEMA_VERSION,
        }


