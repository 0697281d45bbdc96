"""`zeropass index-many SPEC --db DB [--ray [ADDRESS]]`: many models (a family, a training series)
into one dataset, one after the other here or as Ray tasks on a cluster.

SPEC is a TOML file (docs/DATASET.md "Merging and many models")::

    [defaults]                 # optional: applies to every model below
    k = 50
    pairs = 200

    [[model]]
    source = "openai-community/gpt2"      # local directory, .gguf file or hub id
    name = "gpt2"                         # default: from source
    revision = "main"                     # hub ids only
    variant = "raw"                       # raw | folded
    layers = "0-5"                        # default: all

    [[series]]                            # one model at many training steps
    name = "pythia-70m"
    source = "EleutherAI/pythia-70m"
    revisions = ["step1000", "step2000"]  # hub revisions; the step is the number in each
    # or: directory = "ckpts"             # its subdirectories step100/, 200/, checkpoint-300/ ...
    # or: steps = { 100 = "ckpts/a", 200 = "ckpts/b" }

Each series step is the model ``<name>-step<N>`` with ``models.series = name`` and
``models.step = N``. A rerun does only what is missing: a model already in DB with the same
source and settings is skipped, an unfinished build resumes (``indexer.dataset.Build``). A model
that fails is reported in one line and the others go on.

With Ray each model (or, above ``shard_bytes`` of weights, each layer range of it) is one task
that indexes into its own shard dataset under ``DB/.builds/staging/``; the driver merges the
finished shards into DB with :func:`indexer.merge.merge` and deletes them. A task whose worker
dies is retried by Ray and resumes from its shard's progress record.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from schemas.format import BadManifest, first_line, model_settings, read_manifest

from .errors import MissingDependency, ZeropassError

if TYPE_CHECKING:
    from .build import IndexOptions

Progress = Callable[[str], None]
STAGING = Path(".builds") / "staging"
# Above this many bytes of weights a model is split into layer ranges of about this size (Ray only).
SHARD_BYTES = 4 << 30
_KEYS = {"source", "name", "revision", "variant", "k", "pairs", "layers", "device", "allow_pickle"}
_SERIES_KEYS = (_KEYS - {"source", "revision"}) | {"source", "revisions", "directory", "steps"}


class SpecError(ZeropassError, ValueError):
    """The SPEC file cannot be read or names something that cannot be built."""


@dataclass(frozen=True)
class Job:
    """One model to build (or one layer range of it, ``shard``)."""

    name: str
    source: str
    revision: Optional[str] = None
    variant: str = "raw"
    k: int = 50
    pairs: int = 200
    layers: Optional[str] = None
    device: str = "cpu"
    allow_pickle: bool = False
    series: Optional[str] = None
    step: Optional[int] = None
    shard: Optional[str] = None  # a layer range, for a model split across Ray tasks

    @property
    def label(self) -> str:
        return f"{self.name} layers {self.shard}" if self.shard else self.name

    def options(self) -> "IndexOptions":
        """How this job (its shard, if any) is indexed; BadOption if a value is unusable."""
        from .build import IndexOptions

        return IndexOptions(k=self.k, n_pairs=self.pairs, variant=self.variant, device=self.device,
                            layers=self.shard or self.layers, allow_pickle=self.allow_pickle, progress=None,
                            series=self.series, step=self.step)


# -- the spec ------------------------------------------------------------------------------

def read_spec(path: str | Path, progress: Optional[Progress] = None) -> list[Job]:
    """The jobs a SPEC file lists (relative paths are relative to the SPEC's directory).

    Every value is checked here, before any model is built: a value a build would refuse after
    loading (minutes) fails the whole SPEC at once. ``progress`` hears what is skipped.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"SPEC {path} does not exist: give a TOML file listing [[model]] and [[series]] entries") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"SPEC {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"SPEC {path} is not valid TOML ({e})") from None
    unknown = set(spec) - {"defaults", "model", "series"}
    if unknown:
        raise SpecError(f"SPEC {path} has unknown sections {sorted(unknown)}: use [defaults], [[model]], [[series]]")
    base = path.resolve().parent
    defaults = spec.get("defaults", {})
    _check_table(defaults, _KEYS - {"source", "name", "revision"}, f"SPEC {path} [defaults]")
    jobs: list[Job] = []
    for i, m in enumerate(_list(spec, "model", path)):
        where = f"SPEC {path} [[model]] #{i + 1}"
        _check_table(m, _KEYS, where)
        jobs.append(_job(dict(defaults, **m), base, where))
    for i, s in enumerate(_list(spec, "series", path)):
        where = f"SPEC {path} [[series]] #{i + 1}"
        _check_table(s, _SERIES_KEYS, where)
        if not isinstance(s.get("name"), str) or not s["name"]:
            raise SpecError(f"{where} has no name: a series needs name = \"...\" (its models are NAME-stepN)")
        for step, source, revision in _steps(s, base, where, progress or (lambda _m: None)):
            job = dict(defaults, **{k: v for k, v in s.items() if k in _KEYS - {"name", "source", "revision"}}, source=source, revision=revision,
                       name=f"{s['name']}-step{step}")
            jobs.append(_job(job, base, where, series=s["name"], step=step))
    if not jobs:
        raise SpecError(f"SPEC {path} lists no models: add [[model]] or [[series]] entries")
    seen: dict[str, int] = {}
    for j in jobs:
        seen[j.name] = seen.get(j.name, 0) + 1
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise SpecError(f"SPEC {path} names {', '.join(map(repr, dup))} more than once: give each model its own name")
    return jobs


def _list(spec: dict, key: str, path: Path) -> list[dict]:
    v = spec.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise SpecError(f"SPEC {path}: {key} must be written [[{key}]] (a list of tables)")
    return v


def _check_table(t, allowed: set[str], where: str) -> None:
    if not isinstance(t, dict):
        raise SpecError(f"{where} is not a table")
    unknown = sorted(set(t) - allowed)
    if unknown:
        raise SpecError(f"{where} has unknown keys {unknown}: allowed are {sorted(allowed)}")


def _local(source: str, base: Path) -> str:
    """A relative local path is relative to the SPEC; a hub id stays as it is."""
    p = Path(os.path.expanduser(source))
    if not p.is_absolute() and (base / p).exists():
        return str(base / p)
    return str(p) if p.is_absolute() or p.exists() else source


def _job(m: dict, base: Path, where: str, series: Optional[str] = None, step: Optional[int] = None) -> Job:
    from .build import check_slug, default_slug

    if not isinstance(m.get("source"), str) or not m["source"].strip():
        raise SpecError(f"{where} has no source: give source = \"path, .gguf file or hub id\"")
    source = _local(m["source"], base)
    types = {"name": str, "revision": str, "variant": str, "k": int, "pairs": int, "layers": (str, int),
             "device": str, "allow_pickle": bool}
    for key, t in types.items():
        if m.get(key) is not None and (not isinstance(m[key], t) or (t is int and isinstance(m[key], bool))):
            raise SpecError(f"{where}: {key} = {m[key]!r} has the wrong type")
    name = m.get("name") or default_slug(m["source"] if m.get("revision") is None else f"{m['source']}-{m['revision']}")
    try:
        check_slug(name)
        job = Job(name=name, source=source, revision=m.get("revision"), variant=m.get("variant", "raw"),
                  k=m.get("k", 50), pairs=m.get("pairs", 200),
                  layers=None if m.get("layers") is None else str(m["layers"]), device=m.get("device", "cpu"),
                  allow_pickle=m.get("allow_pickle", False), series=series, step=step)
        job.options()  # checked here, before any model is loaded
    except ZeropassError as e:
        raise SpecError(f"{where}: {e}") from None
    return job


_STEP = re.compile(r"^(?:step|checkpoint|ckpt|global_step|iter)?[-_]?([0-9]+)$", re.I)


def _steps(s: dict, base: Path, where: str, say: Progress) -> list[tuple[int, str, Optional[str]]]:
    """(step, source, revision) of each checkpoint of a series, by step."""
    given = [k for k in ("revisions", "directory", "steps") if k in s]
    if len(given) != 1:
        raise SpecError(f"{where} needs exactly one of revisions = [...] (with source), directory = \"...\" "
                        f"or steps = {{N = \"path\"}}")
    out = []
    if "revisions" in s:
        if not isinstance(s.get("source"), str) or not isinstance(s["revisions"], list):
            raise SpecError(f"{where}: revisions = [\"step1000\", ...] needs source = \"hub id or path\"")
        for rev in s["revisions"]:
            m = re.search(r"([0-9]+)", str(rev))
            if not m:
                raise SpecError(f"{where}: revision {rev!r} has no step number in it")
            out.append((int(m.group(1)), s["source"], str(rev)))
    elif "directory" in s:
        d = Path(_local(str(s["directory"]), base))
        if not d.is_dir():
            raise SpecError(f"{where}: directory {s['directory']!r} does not exist")
        skipped = []
        for sub in sorted(d.iterdir()):
            m = _STEP.match(sub.name)
            if sub.is_dir() and m:
                out.append((int(m.group(1)), str(sub), None))
            else:
                skipped.append(sub.name)
        if skipped and out:
            say(f"{where}: skipped {len(skipped)} entr{'ies' if len(skipped) != 1 else 'y'} of {d} that "
                f"{'are' if len(skipped) != 1 else 'is'} not a step directory (stepN/, N/, checkpoint-N/): "
                f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}")
        if not out:
            raise SpecError(f"{where}: directory {d} has no step subdirectories (step100/, 200/, checkpoint-300/)")
    else:
        if not isinstance(s["steps"], dict):
            raise SpecError(f"{where}: steps must be a table, steps = {{100 = \"path\", 200 = \"path\"}}")
        for k, v in s["steps"].items():
            if not str(k).isdigit() or not isinstance(v, str):
                raise SpecError(f"{where}: steps entry {k!r} = {v!r} is not N = \"path\"")
            out.append((int(k), _local(v, base), None))
    from .build import INT64_MAX

    by_step: dict[int, list[str]] = {}
    for st, source, revision in out:
        by_step.setdefault(st, []).append(revision or source)
    for st, names in sorted(by_step.items()):
        if not 0 <= st <= INT64_MAX:
            raise SpecError(f"{where}: step {st} ({names[0]}) is not a step number from 0 to {INT64_MAX} "
                            f"(models.step is a 64-bit integer)")
        if len(names) > 1:
            raise SpecError(f"{where} has step {st} more than once ({', '.join(names)}): keep one of them")
    return sorted(out)


# -- what is already done ------------------------------------------------------------------

def _done(db: Path, job: Job) -> bool:
    """Whether DB holds ``job``'s model from the same source with the same settings."""
    import pyarrow.parquet as pq

    from .build import parse_layers

    try:
        manifest = read_manifest(db)
    except BadManifest:
        return False
    entry = (manifest or {}).get("models", {}).get(job.name)
    if not entry or entry.get("source") != _ref(job):
        return False
    try:
        row = pq.read_table(db / entry["files"]["models"][0]).to_pylist()[0]
        settings = model_settings(row)
        layers = parse_layers(job.shard or job.layers, row["n_layers"])
    except Exception:  # anything unreadable: not done, the build decides
        return False
    return (settings.get("k_requested") == job.k and settings.get("n_pairs_requested") == job.pairs
            and row["variant"] == job.variant and settings.get("layers") == layers
            and row.get("series") == job.series and row.get("step") == job.step)


def _ref(job: Job) -> str:
    """What is handed to the loader: the source, or a hub snapshot at the job's revision."""
    if job.revision is None or Path(job.source).exists():
        return job.source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(job.source, revision=job.revision)
    except Exception as e:  # offline, unknown revision, ...
        raise SpecError(f"{job.source} at revision {job.revision} cannot be fetched: {first_line(e)}") from None


def build_one(job: Job, db: str | Path) -> dict:
    """Index one job into ``db`` (resumes an unfinished build of it)."""
    from .build import index_model

    return index_model(_ref(job), db, job.options(), name=job.name)


# -- driving -------------------------------------------------------------------------------

@dataclass
class ManyReport:
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class _Clock:
    """One progress line per finished model or shard, with elapsed time and an ETA."""

    def __init__(self, total: int, say: Progress):
        self.total, self.say, self.t0, self.n, self.worked = total, say, time.perf_counter(), 0, 0

    def tick(self, label: str, what: str, worked: bool = True) -> None:
        self.n += 1
        self.worked += worked
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.n
        eta = elapsed / max(self.worked, 1) * left if self.worked else 0.0
        self.say(f"[{self.n}/{self.total}] {label}: {what} (elapsed {_hms(elapsed)}, ETA {_hms(eta)})")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ZeropassError) else f"{type(e).__name__}: {text}"


def index_many(spec: str | Path, db: str | Path, *, ray: Optional[str] = None, use_ray: bool = False,
               progress: Optional[Progress] = None, shard_bytes: int = SHARD_BYTES) -> ManyReport:
    """Build every model SPEC lists into ``db``: here, one after the other, or with ``use_ray`` as
    Ray tasks (``ray``: the cluster address; None starts a local instance, or uses the one this
    process already joined)."""
    from .dataset import check_writable, commit, dataset_lock, open_dataset

    say = progress or (lambda _m: None)
    jobs = read_spec(spec, say)
    db = Path(db)
    check_writable(db)
    with dataset_lock(db):  # the (empty) manifest first: staged shards then sit in a dataset, not a stranger's dir
        if open_dataset(db) is None:
            commit(db, lambda m: [])
    if use_ray:
        return _with_ray(jobs, db, ray, say, shard_bytes)
    report = ManyReport()
    clock = _Clock(len(jobs), say)
    for job in jobs:
        if _done(db, job):
            report.skipped.append(job.name)
            clock.tick(job.label, "already in the dataset", worked=False)
            continue
        t = time.perf_counter()
        try:
            build_one(job, db)
        except ZeropassError as e:
            report.failed[job.name] = _one_line(e)
            clock.tick(job.label, f"FAILED: {report.failed[job.name]}")
            continue
        except Exception as e:  # a bug in one model's build must not stop the others either
            report.failed[job.name] = _one_line(e)
            clock.tick(job.label, f"FAILED: {report.failed[job.name]}")
            continue
        report.built.append(job.name)
        clock.tick(job.label, f"indexed in {_hms(time.perf_counter() - t)}")
    return report


# -- Ray -----------------------------------------------------------------------------------

def _weights_bytes(source: str) -> int:
    p = Path(source)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return 0


def _n_layers(source: str) -> Optional[int]:
    import json

    try:
        cfg = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def split(job: Job, shard_bytes: int) -> list[Job]:
    """``job`` as layer-range shards when its weights exceed ``shard_bytes`` (local checkpoints with
    every layer asked for; otherwise one task)."""
    size = _weights_bytes(job.source)
    n = _n_layers(job.source) if job.layers is None else None
    if not n or size <= shard_bytes:
        return [job]
    parts = min(n, math.ceil(size / shard_bytes))
    per = math.ceil(n / parts)
    return [Job(**dict(asdict(job), shard=f"{lo}-{min(lo + per, n) - 1}")) for lo in range(0, n, per)]


def _staging(db: Path, job: Job) -> Path:
    return db / STAGING / (job.name + (f".L{job.shard}" if job.shard else ""))


def _with_ray(jobs: list[Job], db: Path, address: Optional[str], say: Progress, shard_bytes: int) -> ManyReport:
    try:
        import ray
    except ImportError:
        raise MissingDependency("--ray needs Ray: pip install 'zeropass[distributed]'") from None
    from .merge import merge

    if not ray.is_initialized():
        if address:  # a cluster: its nodes have zeropass installed and see DB (docs/DATASET.md)
            ray.init(address=address, log_to_driver=False)
        else:  # a local Ray: its workers import this package from where the driver does
            root = str(Path(__file__).resolve().parents[1])
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": root}}, include_dashboard=False, log_to_driver=False)

    @ray.remote(max_retries=3)
    def _build_shard(job: Job, shard_db: str) -> str:
        build_one(job, shard_db)
        return shard_db

    report = ManyReport()
    tasks = {}
    pending_jobs = [j for j in jobs if not _done(db, j)]
    for j in jobs:
        if j not in pending_jobs:
            report.skipped.append(j.name)
    shards = [s for j in pending_jobs for s in split(j, shard_bytes)]
    clock = _Clock(len(shards), say)
    for j in report.skipped:
        say(f"{j}: already in the dataset")
    started = {}
    for s in shards:
        target = _staging(db, s)
        if _done(target, s):  # finished in an earlier run, merge still pending
            clock.tick(s.label, "already built (in staging)", worked=False)
            tasks[ray.put(str(target))] = s  # a reference that is ready now
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        ref = _build_shard.remote(s, str(target))
        tasks[ref] = s
        started[ref] = time.perf_counter()
    ok: dict[str, list[Path]] = {}
    failed_models: set[str] = set()
    remaining = list(tasks)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        ref = ready[0]
        s = tasks[ref]
        try:
            path = ray.get(ref)
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            failed_models.add(s.name)
            report.failed.setdefault(s.name, _one_line(cause))
            clock.tick(s.label, f"FAILED: {_one_line(cause)}")
            continue
        ok.setdefault(s.name, []).append(Path(path))
        if ref in started:
            clock.tick(s.label, f"indexed in {_hms(time.perf_counter() - started[ref])}")
    paths = [p for name, ps in ok.items() if name not in failed_models for p in ps]
    if paths:
        merge(paths, db, progress=None)
        for name, ps in ok.items():
            if name not in failed_models:
                report.built.append(name)
                for p in ps:
                    shutil.rmtree(p, ignore_errors=True)
        say(f"merged {len(paths)} shard(s) into {db}")
    return report

