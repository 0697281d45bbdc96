"""The write commands: index, index-sae, diff, align, index-many, merge, compact, check, publish, and coverage.

Each ``--db`` (and ``merge --into``) they write into is declared ``write=True`` (``cli.base.Place``):
a URL is refused while the arguments are parsed, before a directory or lock exists.
"""
from __future__ import annotations

import os
import sys

import click

from .base import Place, cli, db_option, emit, format_option, progress, quiet_option


def index_options(f):
    # Ranges are checked by the library (indexer.build.IndexOptions), before the model is loaded,
    # so that library callers get the same one-line BadOption as the command line.
    f = click.option("--k", "k", type=int, default=50, show_default=True,
                     help="Tokens kept per side for each vector (more than the vocabulary: the whole vocabulary).")(f)
    f = click.option("--pairs", "n_pairs", type=int, default=200, show_default=True,
                     help="Entries kept per side for each head circuit (QK, OV); 0: none.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")(f)
    f = click.option("--layers", default=None, help="Only these layers, e.g. 0-5 or 0,3,7 (default: all).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) checkpoints: runs code from the file.")(f)
    return f


def replace_option(f):
    return click.option("--replace", is_flag=True,
                        help="Replace a model of the same name indexed from another checkpoint (refused without it).")(f)


@cli.command()
@click.argument("model_ref", metavar="MODEL")
@db_option(write=True)
@click.option("--name", help="Short name (slug) for the model in the dataset; default from MODEL.")
@click.option("--variant", type=click.Choice(["raw", "folded"]), default="raw", show_default=True,
              help="raw (the paper) or folded (norm gains folded in).")
@index_options
@click.option("--vocab-filter", default=None, metavar="alpha|words|FILE",
              help="Lists over readable tokens only: alpha (letters), words (common English words) or a word-list FILE.")
@replace_option
@click.option("--profile", is_flag=True,
              help="At the end, print on stderr the seconds of each phase and layer beside the GEMMs' arithmetic floor.")
@quiet_option
def index(model_ref, db, name, variant, k, n_pairs, device, layers, allow_pickle, vocab_filter, replace, profile, quiet):
    """Project every parameter of MODEL and add it to the dataset.

    MODEL is a local Hugging Face directory, a GGUF file or a hub id.

    \b
      zeropass index ./all-MiniLM-L6-v2 --name minilm --db zeropass-db
    """
    from indexer.build import IndexOptions, index_model

    options = IndexOptions(k=k, n_pairs=n_pairs, variant=variant, device=device, layers=layers,
                           allow_pickle=allow_pickle, replace=replace, progress=progress(quiet), vocab_filter=vocab_filter,
                           profile=profile)
    entry = index_model(model_ref, db, options, name=name)
    if not quiet:
        rows = ", ".join(f"{t} {n}" for t, n in entry.get("row_counts", {}).items())
        click.echo(f"indexed {model_ref} into {db} ({rows})", err=True)
    if quiet and entry.get("removed_dictionaries"):  # progress says it otherwise; said even with --quiet: data left the dataset
        click.echo(f"removed the dictionaries of {entry['model']} ({', '.join(entry['removed_dictionaries'])}): they were "
                   f"projected through its previous weights; index them again with `zeropass index-sae`", err=True)


@cli.command()
@click.argument("model_ref", metavar="MODEL")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) checkpoints.")
@format_option
@quiet_option
def coverage(model_ref, allow_pickle, fmt, quiet):
    """Every tensor of MODEL's checkpoint: which table projects it, or why none does.

    \b
      zeropass coverage ./all-MiniLM-L6-v2 --format json
    """
    import pyarrow as pa

    from indexer.coverage import coverage_rows

    rows = coverage_rows(model_ref, allow_pickle=allow_pickle)
    cols = ["name", "shape", "layer", "role", "covered_by", "reason"]
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
    emit(table, fmt, quiet, empty=f"No tensors found in {model_ref}.")


def _model_ref(ref: str, db) -> tuple[str, str | None]:
    """A dataset slug resolves to the source it was indexed from; anything else is a MODEL."""
    from schemas.layout import read_manifest

    try:
        manifest = read_manifest(db) if db and os.path.isdir(db) else None
    except ValueError:
        manifest = None
    models = manifest.get("models") if isinstance(manifest, dict) else None
    entry = models.get(ref) if isinstance(models, dict) else None  # a malformed manifest names nothing
    if isinstance(entry, dict) and isinstance(entry.get("source"), str) and not os.path.exists(ref):
        return entry["source"], ref
    return ref, None


@cli.command()
@click.argument("model_a")
@click.argument("model_b")
@db_option(write=True)
@format_option
@quiet_option
def align(model_a, model_b, db, fmt, quiet):
    """Align the layers and units of two models in embedding space (paper §5).

    MODEL_A / MODEL_B are checkpoints, or names of models in --db (their source is loaded).
    The results are stored in the `alignments` table of --db (replacing an earlier run for
    the same pair), so they can be queried with `zeropass sql` afterwards.

    \b
      zeropass align ./all-MiniLM-L6-v2 ./all-mpnet-base-v2
    """
    from indexer.align import align_models, format_layer_table

    (ref_a, name_a), (ref_b, name_b) = _model_ref(model_a, db), _model_ref(model_b, db)
    if not quiet:
        click.echo(f"aligning {ref_a} and {ref_b}", err=True)
    result, table = align_models(ref_a, ref_b, name_a=name_a, name_b=name_b)
    from indexer.dataset import store_alignment

    rel = store_alignment(db, result.model_a, result.model_b, table)
    if not quiet:
        click.echo(f"stored {table.num_rows:,} rows in the alignments table of {db} ({rel})", err=True)
    if fmt == "table":
        click.echo(format_layer_table(result))
    else:
        emit(table, fmt, quiet)


@cli.command()
@click.argument("base")
@click.argument("tuned")
@db_option(write=True)
@click.option("--name", help="Name of the diff model in the dataset (default: TUNED's name + -diff).")
@index_options
@replace_option
@quiet_option
def diff(base, tuned, db, name, k, n_pairs, device, layers, allow_pickle, replace, quiet):
    """Index the fine-tuning delta TUNED - BASE as its own model (paper §4).

    \b
      zeropass diff ./base ./tuned --name tuned-diff
      zeropass neurons paris --model tuned-diff
    """
    from indexer.build import IndexOptions, index_diff

    options = IndexOptions(k=k, n_pairs=n_pairs, device=device, layers=layers, allow_pickle=allow_pickle,
                           replace=replace, progress=progress(quiet))
    entry = index_diff(base, tuned, db, options, name=name)
    if not quiet:
        rows = ", ".join(f"{t} {n}" for t, n in entry.get("row_counts", {}).items())
        click.echo(f"indexed {tuned} - {base} into {db} ({rows})", err=True)


@cli.command("index-many")
@click.argument("spec", type=click.Path(dir_okay=False))
@db_option(write=True)
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Build on Ray: one task per model (per layer range for large ones); without ADDRESS a local Ray.")
@quiet_option
def index_many(spec, db, ray_address, quiet):
    """Index every model (and training-checkpoint series) a TOML SPEC lists into one dataset.

    A rerun does only what is missing; a model that fails is reported and the others go on.

    \b
      zeropass index-many family.toml --db family-db
      zeropass index-many family.toml --db family-db --ray ray://head:10001
    """
    from indexer.index_many import index_many as build_many

    report = build_many(spec, db, ray=ray_address or None, use_ray=ray_address is not None, progress=progress(quiet))
    if report.failed:
        names = "; ".join(f"{n} ({why})" for n, why in report.failed.items())
        raise click.ClickException(f"{len(report.failed)} of {len(report.failed) + len(report.built) + len(report.skipped)} "
                                   f"models failed: {names}; rerun the same command to retry them")
    if not quiet:
        click.echo(f"{len(report.built)} model(s) indexed, {len(report.skipped)} already in {db}", err=True)


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=Place(local=True), metavar="SRC...")
@click.option("--into", "into", required=True, type=Place(write=True), help="The dataset to merge into (created when new).")
@quiet_option
def merge(sources, into, quiet):
    """Merge datasets built elsewhere (or layer shards of one model) into one dataset.

    \b
      zeropass merge machine-a-db machine-b-db --into family-db
    """
    from indexer.merge import merge as merge_datasets

    merge_datasets(list(sources), into, progress=progress(quiet))


@cli.command()
@db_option(write=True)
@quiet_option
def compact(db, quiet):
    """Fold every table's per-model files into one file across models (faster helpers with many models).

    Atomic: a kill leaves the dataset as it was; rerun to finish. The per-model files stay (they
    are what a compaction is rebuilt from). Needs no torch.

    \b
      zeropass compact --db zeropass-db
    """
    from indexer.compact import compact as compacting

    section = compacting(db, progress=None if quiet else (lambda m: click.echo(m, err=True)))
    if not quiet:
        click.echo(f"compacted {len(section)} tables of {db}" if section else f"nothing to compact in {db} (fewer than 2 models)", err=True)


@cli.command()
@db_option(write=True)  # --repair and --recover write; plain check reads the files itself
@click.option("--repair", is_flag=True, help="Rewrite a stale catalog and delete leftover files (under the writer lock).")
@click.option("--recover", is_flag=True, help="Rebuild a lost or unreadable manifest.json from the dataset's files.")
@click.option("--quick", is_flag=True, help="Skip the sha256 of every file (sizes, footers and row counts are still checked).")
@quiet_option
def check(db, repair, recover, quick, quiet):
    """Verify the dataset: manifest, files, Parquet footers, row counts, hashes, catalog, leftovers.

    Prints one line per problem, naming the model and the command that repairs it; exit code 0
    when the dataset is sound, 1 otherwise. Needs no torch.

    \b
      zeropass check --db zeropass-db
      zeropass check --db zeropass-db --repair
    """
    from indexer import check as checking

    if repair and recover:
        raise click.UsageError("give --repair or --recover, not both (recover first, then repair)")
    if recover:
        manifest = checking.recover(db)
        if not quiet:
            click.echo(f"rebuilt {db}/manifest.json from the files: {len(manifest['models'])} models "
                       f"({', '.join(sorted(manifest['models'])) or 'none'})", err=True)
    elif repair:
        checking.repair(db)
    report = checking.check_dataset(db, hashes=not quick, db=db)
    for problem in report.problems:
        click.echo(str(problem))
    if not quiet:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        verdict = "ok" if report.ok else f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)}"
        click.echo(f"{verdict}: {report.models} models, {report.files} files checked in {db}", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("db", type=Place(local=True))
@click.argument("dest")
@click.option("--dry-run", is_flag=True, help="Say what would be copied and deleted; change nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def publish(db, dest, dry_run, quiet):
    """Copy dataset DB to DEST (a directory or an fsspec URL), data first, manifest last.

    Publishing again copies only what changed. Readers of DEST (`--db DEST`) never see a
    half-published dataset.

    \b
      zeropass publish zeropass-db /srv/www/zeropass-db
      zeropass publish zeropass-db s3://bucket/zeropass-db --dry-run
      zeropass publish zeropass-db hf://datasets/ORG/NAME
    """
    from indexer.publish import publish_dataset

    plan = publish_dataset(db, dest, dry_run=dry_run, progress=progress(quiet))
    if dry_run:
        for rel in plan.upload:
            click.echo(f"copy {rel}")
        for rel in plan.delete:
            click.echo(f"delete {rel}")
    if not quiet or dry_run:
        click.echo(("would publish: " if dry_run else f"published {db} to {plan.dest}: ") + plan.summary(), err=True)


# -- dictionaries (SAEs, transcoders; docs/DICTIONARIES.md) ----------------------------------------

@cli.command("index-sae")
@click.argument("ref", metavar="PATH")
@click.option("--model", "model", required=True, help="The dataset's model the dictionary was trained on (its name).")
@db_option(write=True)
@click.option("--name", help="Dictionary name (default SITE-LLAYER; in a folder of many, a prefix of their paths).")
@click.option("--k", "k", type=int, default=None, help="Tokens kept per side for each feature (default: the model's k).")
@click.option("--neighbours", "n_neighbours", type=int, default=10, show_default=True, help="Neighbours stored per feature (0: none).")
@click.option("--neighbour-scope", default="ff_value,decoder", show_default=True,
              help="Where neighbours are sought: ff_value (the model's FF values), decoder (the other dictionaries indexed with it).")
@click.option("--model-source", default=None, help="Where the model's weights are (default: the source it was indexed from).")
@click.option("--layer", type=int, default=None, help="The dictionary's layer, when its files do not say.")
@click.option("--site", default=None, help="Its site (resid_pre, resid_post, mlp_out, attn_out, z, transcoder), when its files do not say.")
@click.option("--allow-pickle", is_flag=True, help="Allow a pickled (.pt) dictionary: runs code from the file.")
@replace_option
@quiet_option
def index_sae(ref, model, db, name, k, n_neighbours, neighbour_scope, model_source, layer, site, allow_pickle, replace, quiet):
    """Project a dictionary (SAE, transcoder) of MODEL, or every dictionary of a folder, into the dataset.

    PATH is a SAELens folder, a Gemma Scope params.npz (or its folder), a sparsify folder, a folder of
    many, or a hub id with its subfolder (org/repo/sub/folder).

    \b
      zeropass index-sae ./gpt2-res-jb/blocks.8.hook_resid_pre --model gpt2 --name res-L8
    """
    from indexer.dictionaries.index import index_dictionaries

    entries = index_dictionaries(ref, db, model=model, name=name, k=k, n_neighbours=n_neighbours,
                                 neighbours=tuple(s.strip() for s in neighbour_scope.split(",") if s.strip()),
                                 model_source=model_source, layer=layer, site=site, allow_pickle=allow_pickle,
                                 replace=replace, progress=progress(quiet))
    if not quiet:
        click.echo(f"indexed {len(entries)} dictionar{'y' if len(entries) == 1 else 'ies'} of {model} into {db}: "
                   + ", ".join(e["dictionary"] for e in entries), err=True)
