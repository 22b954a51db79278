"""The ``prunescope`` command line: one sub-command per stage, all thin wrappers over ``core``.

Every :class:`core.errors.PrunescopeError` becomes one line on stderr (``error: ...``) and a
non-zero exit code; only bugs show a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import ConfigError, PrunescopeError

app = typer.Typer(
    name="prunescope",
    help="Curate image-text data: concept clusters, pruning, train-test similarity, robustness.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Register, list and inspect datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
embeddings_app = typer.Typer(help="List and import embedding sets.", no_args_is_help=True)
app.add_typer(embeddings_app, name="embeddings")
eval_app = typer.Typer(help="Evaluate models (zero-shot, corruptions, detection).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(help="Train models (CLIP, image classifiers with noise), on a dataset or a manifest.",
                         no_args_is_help=True)
app.add_typer(train_app, name="train")
jobs_app = typer.Typer(help="Background jobs: stages run as their own processes, queued in the runs table.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
adapt_app = typer.Typer(help="Test-time adaptation methods and their hyper-parameter selection.", no_args_is_help=True)
app.add_typer(adapt_app, name="adapt")
experiment_app = typer.Typer(help="Controlled experiments that check a method's claim.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")
corrupt_app = typer.Typer(help="Write corrupted copies (ImageNet-C style) of a labelled dataset or a detection set.",
                          no_args_is_help=True)
app.add_typer(corrupt_app, name="corrupt")

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="workspace folder [env PRUNESCOPE_WORKSPACE; default data/workspace]"),
]


def _ws(path: Path | None, *, create: bool = True):  # -> Workspace (lazy import keeps --help fast)
    from core.workspace import Workspace

    return Workspace(path, create=create)


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they parse (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"option {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


#: Terminal control characters (C0 but tab and newline, DEL, C1): ESC sequences in a caption or a file name
#: could clear the screen, retitle the terminal or forge output, so the CLI never prints them raw.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def inert(text: object) -> str:
    """``text`` with terminal control characters shown as ``\\xNN`` escapes (user data printed as plain text)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _print_table(df: Any) -> None:
    if df.empty:
        typer.echo("(none)")
        return
    typer.echo(inert(df.to_string(index=False)))


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log at INFO level")] = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Stages may lower the `core` logger's level to fill their run's log.txt; the console keeps its own.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)


@app.command()
def init(workspace: WorkspaceOpt = None) -> None:
    """Create (or migrate) a workspace."""
    ws = _ws(workspace)
    typer.echo(f"workspace {ws.root} ready (schema version {ws.catalog.version()})")


@app.command()
def version() -> None:
    """Print the prunescope version."""
    from importlib.metadata import version as _v

    typer.echo(_v("prunescope"))


@datasets_app.command("add")
def datasets_add(
    name: Annotated[str, typer.Argument(help="dataset name (letters, digits, _ . -)")],
    kind: Annotated[str, typer.Argument(help="source kind; see `prunescope datasets kinds`")],
    uri: Annotated[Path, typer.Argument(help="folder or file of the source")],
    role: Annotated[str, typer.Option(help="pool | benchmark | reference")] = "pool",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="reader option key=value (repeatable)")] = None,
    replace: Annotated[bool, typer.Option(help="re-register a dataset of the same name")] = False,
    verify: Annotated[bool, typer.Option(help="decode every image to find corrupt ones")] = True,
    workspace: WorkspaceOpt = None,
) -> None:
    """Scan a source and register it as a dataset (the source itself is never modified)."""
    from core.datasets import register_dataset

    ws = _ws(workspace)
    info = register_dataset(ws, name, kind, uri, role=role, options=_parse_options(option), replace=replace,
                            verify=verify, progress=sys.stderr.isatty())
    typer.echo(f"registered {info.name} ({info.kind}, {info.role}): {info.n_samples} samples; {info.report.summary()}")


@datasets_app.command("list")
def datasets_list(workspace: WorkspaceOpt = None) -> None:
    """List registered datasets with counts and skips."""
    from core.datasets import list_datasets

    _print_table(list_datasets(_ws(workspace)).drop(columns=["created_at"]))


@datasets_app.command("show")
def datasets_show(name: str, workspace: WorkspaceOpt = None) -> None:
    """Show one dataset: its catalog row, what was skipped or repaired, and a few samples."""
    from core.datasets import dataset_issues, dataset_row, open_dataset

    ws = _ws(workspace)
    row = dataset_row(ws, name)
    for key, value in row.items():
        typer.echo(inert(f"{key:>13}: {value}"))
    typer.echo("\nissues:")
    _print_table(dataset_issues(ws, name))
    typer.echo("\nfirst samples:")
    cols = [c for c in ("id", "caption", "label", "class_name") if c in open_dataset(ws, name).index]
    _print_table(open_dataset(ws, name).index[cols].head(5))


@datasets_app.command("remove")
def datasets_remove(name: str, workspace: WorkspaceOpt = None) -> None:
    """Forget a dataset (its index and catalog rows); source files are untouched."""
    from core.datasets import remove_dataset

    remove_dataset(_ws(workspace), name)
    typer.echo(f"removed {name}")


@datasets_app.command("kinds")
def datasets_kinds() -> None:
    """List the source kinds and their options."""
    from core.sources import SOURCES

    for entry in SOURCES:
        typer.echo(f"{entry.name}: {entry.summary}")
        for p in entry.params:
            typer.echo(f"    {p.name} ({p.kind}, default {p.default!r}): {p.help}")


@app.command()
def embed(
    dataset: Annotated[str, typer.Argument(help="registered dataset to embed")],
    model: Annotated[str, typer.Option(help="open_clip architecture or project config")] = "demo-vit-tiny",
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag (downloads once)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="local weights file")] = None,
    modality: Annotated[str, typer.Option(help="image | text | both")] = "image",
    batch_size: Annotated[int, typer.Option(help="rows per forward pass")] = 128,
    num_workers: Annotated[int | None, typer.Option(help="image-decoding worker processes")] = None,
    shard_rows: Annotated[int, typer.Option(help="rows per output shard")] = 65_536,
    dtype: Annotated[str, typer.Option(help="float16 | float32 on disk")] = "float16",
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="download cache for pretrained weights")] = None,
    set_id: Annotated[str | None, typer.Option(help="name of the embedding set")] = None,
    limit: Annotated[int | None, typer.Option(help="embed only the first N samples")] = None,
    replace: Annotated[bool, typer.Option(help="recompute an existing set from scratch")] = False,
    backend: Annotated[str, typer.Option(help="local | ray (run on a Ray cluster, see --address)")] = "local",
    address: Annotated[str | None, typer.Option(help="with --backend ray: auto (the running cluster) | local "
                                                     "(a Ray on this machine) | HOST:PORT [default: auto]")] = None,
    num_gpus: Annotated[float | None, typer.Option(help="with --backend ray: GPUs per embedding actor "
                                                         "[default: 0, CPU actors]")] = None,
    actors: Annotated[int | None, typer.Option(help="with --backend ray: embedding actors, each holding the model "
                                                    "[default: 1]")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Embed a dataset's images and/or captions (sharded, resumable: rerun to continue)."""
    from core.distributed import make_backend
    from core.embed import EmbedConfig, embed_dataset

    kw: dict[str, Any] = {} if num_workers is None else {"num_workers": num_workers}
    cfg = EmbedConfig(dataset=dataset, model=model, pretrained=pretrained,
                      checkpoint=str(checkpoint) if checkpoint else None, modality=modality, batch_size=batch_size,
                      shard_rows=shard_rows, dtype=dtype, device=device, precision=precision,
                      cache_dir=str(cache_dir) if cache_dir else None, set_id=set_id, limit=limit, **kw)
    runner = make_backend(backend, address, num_gpus=num_gpus, actors=actors)
    info = embed_dataset(_ws(workspace), cfg, progress=sys.stderr.isatty(), replace=replace, backend=runner)
    rate = f", {info.images_per_s:.1f} rows/s" if info.images_per_s else ""
    typer.echo(f"embedding set {info.id}: {info.n} rows x {info.dim} ({info.dtype}), {info.n_skipped} skipped{rate}")


@app.command()
def cluster(
    embedding_set: Annotated[str, typer.Argument(help="embedding set to cluster (see `prunescope embeddings list`)")],
    k: Annotated[int, typer.Option("--k", help="number of clusters")] = 100,
    seed: Annotated[int, typer.Option(help="k-means seed")] = 1234,
    niter: Annotated[int, typer.Option(help="k-means iterations")] = 20,
    fit_sample: Annotated[int | None, typer.Option(help="fit centroids on this many random rows")] = None,
    neighbors: Annotated[int, typer.Option(help="nearest centroids averaged in d_inter")] = 20,
    clustering_id: Annotated[str | None, typer.Option("--id", help="name of the clustering")] = None,
    vocabulary: Annotated[Path | None, typer.Option(help="names (.txt lines or .json list) to name clusters "
                                                          "with through the set's CLIP text tower")] = None,
    templates: Annotated[Path | None, typer.Option(help="prompt templates for --vocabulary ('a photo of a {}.')")] = None,
    replace: Annotated[bool, typer.Option(help="recompute an existing clustering")] = False,
    backend: Annotated[str, typer.Option(help="local | ray (run on a Ray cluster, see --address)")] = "local",
    address: Annotated[str | None, typer.Option(help="with --backend ray: auto (the running cluster) | local "
                                                     "(a Ray on this machine) | HOST:PORT [default: auto]")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Spherical k-means (faiss) of an embedding set, with per-cluster size, d_intra, d_inter, complexity, label."""
    from core.clustering import ClusterConfig, run_clustering
    from core.distributed import make_backend

    cfg = ClusterConfig(embedding_set=embedding_set, k=k, seed=seed, niter=niter, fit_sample=fit_sample,
                        n_neighbors=neighbors, clustering_id=clustering_id,
                        vocabulary=str(vocabulary) if vocabulary else None, templates=str(templates) if templates else None)
    info = run_clustering(_ws(workspace), cfg, replace=replace, backend=make_backend(backend, address))
    typer.echo(f"clustering {info.id}: {info.n} rows in {info.k} clusters, {info.n_skipped} skipped")
    top = info.stats.sort_values("size", ascending=False).head(10)
    cols = ["cluster", "size", "d_intra", "d_inter", "complexity", "label"]
    _print_table(top[cols + (["vocab_label"] if vocabulary else [])])


@app.command()
def maps(
    clustering: Annotated[str, typer.Argument(help="a clustering (see `prunescope clusterings`)")],
    cluster: Annotated[list[int] | None, typer.Option("--cluster", help="member maps of these clusters only "
                                                                          "(repeatable; default: all)")] = None,
    centroids_only: Annotated[bool, typer.Option(help="only the map of the centroids")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """UMAP 2-D maps of a clustering (centroids, and each cluster's members), cached for the dashboard."""
    from core.project import compute_maps

    todo = [] if centroids_only else (list(cluster) if cluster else None)
    counts = compute_maps(_ws(workspace), clustering, clusters=todo, progress=True)
    typer.echo(f"maps of {clustering}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command()
def search(
    clustering: Annotated[str, typer.Argument(help="a clustering (see `prunescope clusterings`)")],
    text: Annotated[str, typer.Argument(help="what to look for, e.g. 'a red triangle'")],
    top: Annotated[int, typer.Option(help="samples to list")] = 10,
    workspace: WorkspaceOpt = None,
) -> None:
    """Nearest clusters and samples to a phrase, through the embedding set's CLIP text tower."""
    from core.search import search_clustering

    near, samples = search_clustering(_ws(workspace), clustering, text, top_clusters=5, top_samples=top)
    typer.echo("nearest clusters:")
    _print_table(near)
    typer.echo("nearest samples:")
    _print_table(samples.drop(columns=["pos", "row"]))


@app.command()
def clusterings(workspace: WorkspaceOpt = None) -> None:
    """List clusterings."""
    from core.clustering import list_clusterings

    _print_table(list_clusterings(_ws(workspace)).drop(columns=["created_at"]))


def _parse_step(text: str) -> tuple[str, dict[str, str]]:
    """``semdedup:eps=0.05,order=hard`` -> ("semdedup", {"eps": "0.05", "order": "hard"}) (the registry coerces).

    A list value keeps its commas: ``similarity:benchmarks=val,v2,mode=near`` gives benchmarks ``val,v2``.
    """
    name, _, rest = text.partition(":")
    params: dict[str, str] = {}
    last = None
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq and last is not None:
            params[last] += "," + item
            continue
        if not eq or not key.strip():
            from core.errors import ConfigError

            raise ConfigError(f"step parameter {item!r} is not key=value", hint="e.g. --step dbp:keep_fraction=0.5,tau=0.5")
        last = key.strip()
        params[last] = value.strip()
    return name.strip(), params


@app.command()
def prune(
    clustering: Annotated[str, typer.Argument(help="a clustering (see `prunescope clusterings`)")],
    step: Annotated[list[str], typer.Option("--step", help="METHOD[:key=value,...], repeatable, run in order "
                                                           "(e.g. --step semdedup:eps=0.05 --step dbp:keep_fraction=0.5)")],
    fraction_of: Annotated[str, typer.Option(help="a step's keep_fraction is of its input | of the pool")] = "input",
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    pruning_id: Annotated[str | None, typer.Option("--id", help="name of the manifest")] = None,
    replace: Annotated[bool, typer.Option(help="recompute an existing manifest")] = False,
    backend: Annotated[str, typer.Option(help="local | ray (run on a Ray cluster, see --address)")] = "local",
    address: Annotated[str | None, typer.Option(help="with --backend ray: auto (the running cluster) | local "
                                                     "(a Ray on this machine) | HOST:PORT [default: auto]")] = None,
    device: Annotated[str, typer.Option(help="where SemDeDup's pairwise products run: auto (a CUDA GPU when "
                                             "there is one) | cpu | cuda | cuda:N")] = "auto",
    workspace: WorkspaceOpt = None,
) -> None:
    """Prune a clustering with a chain of methods; writes manifests/<id>.parquet (kept + removed with reasons)."""
    from core.distributed import make_backend
    from core.prune.manifest import PruneConfig, run_pruning

    cfg = PruneConfig(clustering_id=clustering, chain=[_parse_step(s) for s in step], seed=seed,
                      fraction_of=fraction_of, pruning_id=pruning_id)
    info = run_pruning(_ws(workspace), cfg, replace=replace, backend=make_backend(backend, address), device=device)
    typer.echo(f"pruning {info.id}: kept {info.n_kept:,} of {info.n_in:,} ({info.n_kept / max(info.n_in, 1):.1%})")
    for reason, count in sorted(info.meta.get("removed_by_reason", {}).items()):
        if count:
            typer.echo(f"  removed {count:,}: {reason}")
    typer.echo(f"manifest: {info.manifest_path}")


@app.command()
def prunings(workspace: WorkspaceOpt = None) -> None:
    """List saved prunings (manifests)."""
    from core.prune.manifest import list_prunings

    _print_table(list_prunings(_ws(workspace))[["id", "methods", "n_in", "n_kept"]])


@app.command()
def methods() -> None:
    """List the pruning methods and their parameters."""
    from core.prune import METHODS

    for entry in METHODS:
        typer.echo(f"{entry.name}: {entry.summary}" + (f" [{entry.paper}]" if entry.paper else ""))
        for p in entry.params:
            rng = f" [{p.min}, {p.max}]" if p.min is not None or p.max is not None else ""
            choices = f" one of {', '.join(map(str, p.choices))}" if p.choices else ""
            typer.echo(f"    {p.name} ({p.kind}, default {p.default}){rng}{choices}: {p.help}")


@app.command()
def export(
    pruning: Annotated[str, typer.Argument(help="a saved pruning (see `prunescope prunings`)")],
    out: Annotated[Path, typer.Option(help="file to write")],
    fmt: Annotated[str, typer.Option("--format", help="ids | datacomp | wds_keys")] = "ids",
    workspace: WorkspaceOpt = None,
) -> None:
    """Export a manifest's kept ids: a plain id list, a DataComp subset .npy, or webdataset keys."""
    from core.prune.manifest import export_manifest

    ws = _ws(workspace)
    ws.check_output(out)
    path = export_manifest(ws, pruning, fmt, out)
    typer.echo(f"wrote {path}")


@app.command()
def similarity(
    pool_set: Annotated[str, typer.Argument(help="the pool's embedding set")],
    reference_set: Annotated[str, typer.Argument(help="the reference train set's embedding set")],
    benchmark_sets: Annotated[list[str], typer.Argument(help="one embedding set per benchmark")],
    analysis_id: Annotated[str | None, typer.Option("--id", help="name of the analysis")] = None,
    backend: Annotated[str, typer.Option(help="local | ray (run on a Ray cluster, see --address)")] = "local",
    address: Annotated[str | None, typer.Option(help="with --backend ray: auto (the running cluster) | local "
                                                     "(a Ray on this machine) | HOST:PORT [default: auto]")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Train-test similarity (CLIP-OOD): per benchmark, test samples with a pool neighbour closer than their
    reference neighbour, and the pool samples that are (the paper's pruning)."""
    from core.distributed import make_backend
    from core.similarity_stage import SimilarityConfig, run_similarity

    cfg = SimilarityConfig(pool_set=pool_set, reference_set=reference_set, benchmark_sets=tuple(benchmark_sets),
                           analysis_id=analysis_id)
    summary = run_similarity(_ws(workspace), cfg, backend=make_backend(backend, address))
    typer.echo(f"similarity analysis {cfg.id}:")
    _print_table(summary[["benchmark", "n_test", "share_test_pool_closer", "n_prune", "median_s_ref",
                          "median_nn_pool_sim"]])


@embeddings_app.command("list")
def embeddings_list(workspace: WorkspaceOpt = None) -> None:
    """List embedding sets."""
    from core.embed import list_embedding_sets

    _print_table(list_embedding_sets(_ws(workspace)).drop(columns=["created_at", "path"]))


@embeddings_app.command("import-laion")
def embeddings_import_laion(
    dataset: Annotated[str, typer.Argument(help="a registered dataset of kind laion")],
    model: Annotated[str, typer.Option(help="the model that made the embeddings (label, width check)")],
    pretrained: Annotated[str | None, typer.Option(help="its pretrained tag (label)")] = None,
    modality: Annotated[str, typer.Option(help="image | text | both")] = "image",
    set_id: Annotated[str | None, typer.Option(help="name of the embedding set")] = None,
    replace: Annotated[bool, typer.Option(help="re-import an existing set")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Register LAION-style precomputed embeddings as an embedding set (no model runs)."""
    from core.embed import import_laion_embeddings

    info = import_laion_embeddings(_ws(workspace), dataset, model=model, pretrained=pretrained, modality=modality,
                                   set_id=set_id, replace=replace, progress=sys.stderr.isatty())
    typer.echo(f"embedding set {info.id}: {info.n} rows x {info.dim}, {info.n_skipped} skipped")


@eval_app.command("zeroshot")
def eval_zeroshot(
    datasets: Annotated[list[str], typer.Argument(help="labelled datasets to classify")],
    model: Annotated[str, typer.Option(help="open_clip architecture or project config")] = "demo-vit-tiny",
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="local weights file (e.g. a trained run's last.pt)")] = None,
    classnames: Annotated[Path | None, typer.Option(help="class names in label order (.txt or .json)")] = None,
    templates: Annotated[Path | None, typer.Option(help="prompt templates with {} (.txt or .json)")] = None,
    model_label: Annotated[str | None, typer.Option(help="name of the model in the metrics table")] = None,
    retrieval: Annotated[bool, typer.Option(help="also image-text recall@k on captioned data")] = True,
    batch_size: Annotated[int, typer.Option(help="rows per forward pass")] = 256,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Zero-shot top-1/top-5 and per-class accuracy (plus retrieval recall@k) into the metrics table."""
    from core.evaluate.zeroshot import ZeroShotConfig, evaluate_zeroshot

    cfg = ZeroShotConfig(datasets=tuple(datasets), model=model, pretrained=pretrained,
                         checkpoint=str(checkpoint) if checkpoint else None,
                         classnames=str(classnames) if classnames else None,
                         templates=str(templates) if templates else None, model_label=model_label,
                         retrieval=retrieval, batch_size=batch_size, device=device)
    result = evaluate_zeroshot(_ws(workspace), cfg, progress=sys.stderr.isatty())
    main_rows = result[~result.metric.str.startswith("zeroshot_class_acc:")]
    _print_table(main_rows.pivot_table(index="dataset", columns="metric", values="value").reset_index())


@train_app.command("clip")
def train_clip_cmd(
    dataset: Annotated[str | None, typer.Argument(help="registered dataset with captions")] = None,
    manifest: Annotated[str | None, typer.Option(help="pruning manifest (id or parquet path) of kept ids")] = None,
    model: Annotated[str, typer.Option(help="open_clip architecture or project config")] = "demo-vit-tiny",
    pretrained: Annotated[str | None, typer.Option(help="start from this open_clip pretrained tag")] = None,
    loss: Annotated[str, typer.Option(help="infonce | aninfonce")] = "infonce",
    steps: Annotated[int, typer.Option(help="optimiser updates")] = 100,
    batch_size: Annotated[int, typer.Option(help="samples per update (per process)")] = 64,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(help="linear warm-up steps")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints (0: only at the end)")] = 100,
    seed: Annotated[int, typer.Option(help="init, data order, augmentation")] = 0,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    num_workers: Annotated[int, typer.Option(help="data-loading worker processes")] = 0,
    cpu_threads: Annotated[int | None, typer.Option(help="torch CPU threads (1 is fastest on a busy laptop)")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="any other config field key=value")] = None,
    resume: Annotated[str | None, typer.Option(help="resume this run id with its stored config")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Train CLIP (InfoNCE or AnInfoNCE) with checkpoints; --resume RUN_ID continues an interrupted run."""
    from dataclasses import replace

    from core.train.clip import TrainClipConfig, load_run_config, train_clip

    ws = _ws(workspace)
    if resume:
        cfg = load_run_config(ws, resume)
        if device or cpu_threads:
            cfg = replace(cfg, device=device or cfg.device, cpu_threads=cpu_threads or cfg.cpu_threads)
    else:
        if not dataset:
            raise ConfigError("name the dataset to train on (or --resume RUN_ID)")
        values: dict[str, Any] = dict(
            dataset=dataset, manifest=manifest, model=model, pretrained=pretrained, loss=loss, steps=steps,
            batch_size=batch_size, lr=lr, warmup_steps=min(warmup_steps, steps), checkpoint_every=checkpoint_every,
            seed=seed, device=device, precision=precision, num_workers=num_workers, cpu_threads=cpu_threads)
        cfg = TrainClipConfig.from_dict({**values, **_parse_options(option)})
    result = train_clip(ws, cfg, progress=sys.stderr.isatty())
    state = "finished" if result.finished else f"stopped at step {result.steps}/{result.total_steps}"
    typer.echo(f"run {result.run_id} {state}: final loss {result.final_loss:.4f}, {result.img_per_s:.1f} img/s, "
               f"checkpoint {result.checkpoint}")


@train_app.command("classifier")
def train_classifier_cmd(
    dataset: Annotated[str | None, typer.Argument(help="registered labelled dataset (class sub-folders)")] = None,
    arch: Annotated[str, typer.Option(help="classifier architecture (resnet-demo, resnet18, resnet50, ...)")] = "resnet-demo",
    noise: Annotated[str, typer.Option(help="none | gaussian | speckle | ant (noise on half of each batch)")] = "none",
    noise_sigma: Annotated[float | None, typer.Option(help="fixed noise std (default: the paper's per-image set)")] = None,
    epochs: Annotated[int, typer.Option(help="passes over the data")] = 10,
    steps: Annotated[int | None, typer.Option(help="optimiser updates in total (overrides --epochs)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per update")] = 64,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 0.05,
    manifest: Annotated[str | None, typer.Option(help="train only on a pruning manifest's kept ids")] = None,
    val_dataset: Annotated[str | None, typer.Option(help="labelled dataset for the clean accuracy")] = None,
    seed: Annotated[int, typer.Option(help="init, data order, augmentation, noise")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="any other config field key=value")] = None,
    resume: Annotated[str | None, typer.Option(help="resume this run id with its stored config")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Train an image classifier, optionally with Gaussian / speckle / adversarial noise (Rusak et al. 2020)."""
    from core.train.classifier import TrainClassifierConfig, load_run_config, train_classifier

    ws = _ws(workspace)
    if resume:
        cfg = load_run_config(ws, resume)
    else:
        if not dataset:
            raise ConfigError("name the dataset to train on (or --resume RUN_ID)")
        values: dict[str, Any] = dict(dataset=dataset, arch=arch, noise=noise, noise_sigma=noise_sigma, epochs=epochs,
                                      steps=steps, batch_size=batch_size, lr=lr, manifest=manifest,
                                      val_dataset=val_dataset, seed=seed, device=device)
        cfg = TrainClassifierConfig.from_dict({**values, **_parse_options(option)})
    result = train_classifier(ws, cfg, progress=sys.stderr.isatty())
    state = "finished" if result.finished else f"stopped at step {result.steps}/{result.total_steps}"
    val = f", clean val accuracy {result.val_accuracy:.1%}" if result.val_accuracy is not None else ""
    typer.echo(f"run {result.run_id} {state}: final loss {result.final_loss:.4f}{val}, checkpoint {result.checkpoint}")


@corrupt_app.command("images")
def corrupt_images(
    dataset: Annotated[str, typer.Argument(help="registered dataset")],
    out: Annotated[Path, typer.Argument(help="output folder: <corruption>/<severity>/<class>/<image>.jpeg")],
    corruptions: Annotated[str | None, typer.Option(help="comma list (default: the 15 test corruptions)")] = None,
    severities: Annotated[str, typer.Option(help="comma list of 1-5")] = "1,2,3,4,5",
    size: Annotated[int | None, typer.Option(help="resize + centre-crop to this side first (224 for ImageNet-C)")] = None,
    seed: Annotated[int, typer.Option(help="corruption noise (per image)")] = 0,
    workspace: WorkspaceOpt = None,
) -> None:
    """Write an ImageNet-C-style corrupted copy of a labelled dataset (resumable; source untouched)."""
    from core.corrupt import TEST_CORRUPTIONS, write_imagenet_c

    ws = _ws(workspace)
    ws.check_output(out)
    report = write_imagenet_c(dataset, out, ws=ws, corruptions=_csv(corruptions) or TEST_CORRUPTIONS,
                              severities=_ints(severities), seed=seed, size=size, progress=sys.stderr.isatty())
    typer.echo(report.summary())


@corrupt_app.command("detection")
def corrupt_detection(
    data: Annotated[str, typer.Argument(help="COCO json / folder with annotations.json, or a VOC root")],
    out: Annotated[Path, typer.Argument(help="output folder: <corruption>/<severity>/<file> + annotations.json")],
    corruptions: Annotated[str | None, typer.Option(help="comma list (default: the 15 test corruptions)")] = None,
    severities: Annotated[str, typer.Option(help="comma list of 1-5")] = "1,2,3,4,5",
    split: Annotated[str, typer.Option(help="VOC image set")] = "val",
    seed: Annotated[int, typer.Option(help="corruption noise (per image)")] = 0,
    workspace: WorkspaceOpt = None,
) -> None:
    """Write a corrupted copy of a detection set, boxes unchanged (COCO-C / Pascal-C style; resumable)."""
    from core.corrupt import TEST_CORRUPTIONS
    from core.detection.data import open_detection, write_corrupted_detection
    from core.evaluate.detection import resolve_data_path

    ws = _ws(workspace)
    source = resolve_data_path(ws, data)
    ws.check_output(out, sources=[Path(source)])
    ds = open_detection(source, split=split)
    report = write_corrupted_detection(ds, out, corruptions=_csv(corruptions) or TEST_CORRUPTIONS,
                                       severities=_ints(severities), seed=seed, progress=sys.stderr.isatty())
    typer.echo(report.summary())


@train_app.command("detector")
def train_detector_cmd(
    data: Annotated[str | None, typer.Argument(help="training ground truth: COCO json / folder, or a VOC root")] = None,
    arch: Annotated[str, typer.Option(help="detector (demo-frcnn, fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn, "
                                           "fcos_resnet50_fpn, ...)")] = "demo-frcnn",
    val_data: Annotated[str | None, typer.Option(help="evaluation set: clean AP / AP50 at the end")] = None,
    steps: Annotated[int, typer.Option(help="optimiser updates")] = 200,
    batch_size: Annotated[int, typer.Option(help="images per update")] = 12,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 1e-3,
    seed: Annotated[int, typer.Option(help="init, data order, flips, box sampling")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="any other config field key=value")] = None,
    resume: Annotated[str | None, typer.Option(help="resume this run id with its stored config")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Train an object detector (torchvision Faster R-CNN / RetinaNet / FCOS, or the small demo one)."""
    from core.train.detector import TrainDetectorConfig, load_run_config, train_detector

    ws = _ws(workspace)
    if resume:
        cfg = load_run_config(ws, resume)
    else:
        if not data:
            raise ConfigError("give the training data (a COCO json / folder or a VOC root), or --resume RUN_ID")
        values: dict[str, Any] = dict(data=data, arch=arch, val_data=val_data, steps=steps, batch_size=batch_size,
                                      lr=lr, seed=seed, device=device)
        cfg = TrainDetectorConfig.from_dict({**values, **_parse_options(option)})
    result = train_detector(ws, cfg, progress=sys.stderr.isatty())
    state = "finished" if result.finished else f"stopped at step {result.steps}/{result.total_steps}"
    val = f", clean AP {result.ap:.1%} / AP50 {result.ap50:.1%}" if result.ap is not None and result.ap50 is not None else ""
    typer.echo(f"run {result.run_id} {state}: final loss {result.final_loss:.4f}{val}, checkpoint {result.checkpoint}")


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise ConfigError(f"expected a comma list of integers; got {value!r}") from None


@adapt_app.command("methods")
def adapt_methods() -> None:
    """The registered adaptation methods, their papers and parameters (with the reference defaults)."""
    from core.adapt import ADAPTERS

    for name in ADAPTERS.names():
        entry = ADAPTERS.entry(name)
        typer.echo(f"{name}: {entry.summary}" + (f" [{entry.paper}]" if entry.paper else ""))
        for spec in entry.params:
            typer.echo(f"    {spec.name} ({spec.kind}, default {spec.default}): {spec.help}")


@adapt_app.command("select")
def adapt_select(
    dataset: Annotated[str, typer.Argument(help="labelled dataset (clean, corrupted on the fly, or a corrupted tree)")],
    model: Annotated[list[str], typer.Option("--model", help="[LABEL=]CHECKPOINT | RUN_ID; repeatable")],
    method: Annotated[str, typer.Option(help="adaptation method")] = "tent",
    param: Annotated[str, typer.Option(help="the parameter to choose")] = "lr",
    values: Annotated[str, typer.Option(help="comma list of candidate values")] = "1e-4,2.5e-4,1e-3",
    severities: Annotated[str, typer.Option(help="comma list of 1-5")] = "1,2,3,4,5",
    batch_size: Annotated[int, typer.Option(help="test batch size")] = 64,
    limit: Annotated[int | None, typer.Option(help="images per domain")] = None,
    seed: Annotated[int, typer.Option(help="corruption noise and batch order")] = 0,
    workspace: WorkspaceOpt = None,
) -> None:
    """Choose a method's hyper-parameter on the four hold-out corruptions only, and record the choice."""
    from core.evaluate.corruption import CorruptionEvalConfig, select_hyperparameter

    base = CorruptionEvalConfig(dataset=dataset, models=tuple(model), severities=_ints(severities),
                                adaptations=(method,), batch_size=batch_size, limit=limit, seed=seed, clean=False)
    candidates = [float(v) for v in _csv(values)]
    chosen, table = select_hyperparameter(_ws(workspace), base, method, param, candidates,
                                          progress=sys.stderr.isatty())
    _print_table(table)
    typer.echo(f"selected {method} {param} = {chosen} (on the hold-out corruptions)")


@eval_app.command("corruptions")
def eval_corruptions(
    dataset: Annotated[str, typer.Argument(help="labelled dataset: clean (corrupted on the fly) or imagenet_c / cifar_c")],
    model: Annotated[list[str], typer.Option("--model", help="[LABEL=]CHECKPOINT | RUN_ID | clip:CHECKPOINT | "
                                                          "clip:ARCH:TAG; repeatable")],
    corruptions: Annotated[str | None, typer.Option(help="comma list (default: the 15 test corruptions)")] = None,
    severities: Annotated[str, typer.Option(help="comma list of 1-5")] = "1,2,3,4,5",
    adapt: Annotated[str, typer.Option(help="comma list of adaptation methods (prunescope adapt methods)")] = "none",
    setting: Annotated[str, typer.Option(help="reset (source model per domain) | continual")] = "reset",
    clean_dataset: Annotated[str | None, typer.Option(help="clean counterpart of a corrupted tree")] = None,
    batch_size: Annotated[int, typer.Option(help="test batch size (fixed for every method)")] = 64,
    limit: Annotated[int | None, typer.Option(help="images per domain (a quick look)")] = None,
    corrupt_size: Annotated[int | None, typer.Option(help="centre-crop to N px before corrupting (224 = ImageNet-C)")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="METHOD.param=value, e.g. tent.lr=1e-3")] = None,
    seed: Annotated[int, typer.Option(help="corruption noise and batch order")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    num_workers: Annotated[int, typer.Option(help="image loading processes")] = 0,
    resume: Annotated[str | None, typer.Option(help="resume this run id")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Error per corruption x severity x adaptation; mCE, relative mCE, mean error (all severities and sev 5)."""
    from core.evaluate.corruption import CorruptionEvalConfig, evaluate_corruptions, summaries

    params: dict[str, dict[str, Any]] = {}
    for key, value in _parse_options(option).items():
        method, dot, name = key.partition(".")
        if not dot:
            raise ConfigError(f"option {key!r} must be METHOD.param=value", hint="e.g. -o tent.lr=1e-3")
        params.setdefault(method, {})[name] = value
    cfg = CorruptionEvalConfig(
        dataset=dataset, models=tuple(model), corruptions=_csv(corruptions),
        severities=_ints(severities), adaptations=_csv(adapt),
        adapt_params=params, setting=setting, clean_dataset=clean_dataset, batch_size=batch_size, limit=limit,
        corrupt_size=corrupt_size, seed=seed, device=device, num_workers=num_workers, run_id=resume)
    results = evaluate_corruptions(_ws(workspace), cfg, progress=sys.stderr.isatty())
    table = summaries(results)
    if table.empty:
        table = results.groupby(["model", "adaptation"], as_index=False)["error"].mean()
    else:
        table = table.pivot_table(index=["model", "adaptation"], columns="metric", values="value").reset_index()
    _print_table(table)


@eval_app.command("detection")
def eval_detection(
    data: Annotated[str, typer.Argument(help="COCO json / folder with annotations.json, VOC root, or a corrupted "
                                             "tree (write_corrupted_detection); workspace-relative allowed")],
    model: Annotated[list[str], typer.Option("--model", help="[LABEL=]torchvision:ARCH | [LABEL=]PATH.pt | "
                                                          "[LABEL=]RUN_ID (train-detector); repeatable")],
    corruptions: Annotated[str | None, typer.Option(help="comma list (default: the 15 test corruptions)")] = None,
    severities: Annotated[str, typer.Option(help="comma list of 1-5")] = "1,2,3,4,5",
    clean: Annotated[bool, typer.Option(help="also evaluate the clean images (P, rPC)")] = True,
    clean_data: Annotated[str | None, typer.Option(help="clean counterpart of a corrupted tree")] = None,
    metric: Annotated[str, typer.Option(help="primary AP: auto (VOC -> ap50, else ap) | ap | ap50")] = "auto",
    dataset: Annotated[str | None, typer.Option(help="dataset name stored with the metrics")] = None,
    split: Annotated[str, typer.Option(help="VOC image set")] = "val",
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 8,
    limit: Annotated[int | None, typer.Option(help="only the first N images (a quick look)")] = None,
    seed: Annotated[int, typer.Option(help="corruption noise")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    cpu_threads: Annotated[int | None, typer.Option(help="torch CPU threads (1-2 on a small busy CPU)")] = None,
    resume: Annotated[str | None, typer.Option(help="resume this run id")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """COCO AP per corruption x severity; P (clean AP), mPC and rPC (Michaelis et al. 2019)."""
    from core.evaluate.detection import DetectionEvalConfig, evaluate_detection, summaries

    cfg = DetectionEvalConfig(
        data=data, models=tuple(model), corruptions=_csv(corruptions), severities=_ints(severities), clean=clean,
        clean_data=clean_data, metric=metric, dataset=dataset, split=split, batch_size=batch_size, limit=limit,
        seed=seed, device=device, cpu_threads=cpu_threads, run_id=resume)
    results = evaluate_detection(_ws(workspace), cfg, progress=sys.stderr.isatty())
    primary = results.attrs["metric"]
    table = summaries(results, primary)
    if table.empty:
        _print_table(results)
    else:
        _print_table(table.pivot_table(index="model", columns="metric", values="value", sort=False).reset_index())
    typer.echo(f"run {results.attrs['run_id']}: primary metric {primary}" + ("" if (table["metric"] == "mPC").any() else
                                              "; no mPC (it needs the 15 test corruptions at severities 1-5)"))


@jobs_app.command("stages")
def jobs_stages() -> None:
    """The stages a job can run, and their parameters."""
    from core.jobs import STAGES

    for name in STAGES.names():
        entry = STAGES.entry(name)
        typer.echo(f"{name}: {entry.summary}")
        for spec in entry.params:
            typer.echo(f"    {spec.name} ({spec.kind}{', required' if spec.required else ''}, default {spec.default})")


@jobs_app.command("submit")
def jobs_submit(
    stage: Annotated[str, typer.Argument(help="a stage (prunescope jobs stages)")],
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="parameter key=value, repeatable")] = None,
    start: Annotated[bool, typer.Option(help="start it now when under the concurrency limits")] = True,
    workspace: WorkspaceOpt = None,
) -> None:
    """Queue a stage with validated parameters (refused, with the reason, before anything is written)."""
    from core.jobs import schedule, submit

    ws = _ws(workspace)
    run_id = submit(ws, stage, _parse_options(option))
    started = schedule(ws) if start else []
    typer.echo(f"job {run_id} {'started' if run_id in started else 'queued'}")


@jobs_app.command("list")
def jobs_list(workspace: WorkspaceOpt = None) -> None:
    """Jobs, newest first, with their status and progress."""
    from core.jobs import list_jobs, refresh

    ws = _ws(workspace)
    refresh(ws)
    _print_table(list_jobs(ws))


@jobs_app.command("status")
def jobs_status(run_id: str, workspace: WorkspaceOpt = None) -> None:
    """One job: status, progress and the tail of its log."""
    from core.jobs import job_status

    info = job_status(_ws(workspace), run_id)
    for key, value in info.items():
        if key != "log_tail":
            typer.echo(inert(f"{key}: {value}"))
    if info.get("log_tail"):
        typer.echo("--- log tail ---\n" + inert(info["log_tail"]))


@jobs_app.command("cancel")
def jobs_cancel(run_id: str, grace_s: Annotated[float, typer.Option(help="seconds before SIGKILL")] = 10.0,
                workspace: WorkspaceOpt = None) -> None:
    """Cancel a queued or running job (SIGTERM, then SIGKILL after the grace period)."""
    from core.jobs import cancel

    typer.echo(f"job {run_id}: {cancel(_ws(workspace), run_id, grace_s=grace_s)}")


@jobs_app.command("resume")
def jobs_resume(run_id: str, workspace: WorkspaceOpt = None) -> None:
    """Re-queue a failed or cancelled job (training and evaluation continue from their checkpoints)."""
    from core.jobs import resume, schedule

    ws = _ws(workspace)
    typer.echo(f"job {run_id}: {resume(ws, run_id)}")
    schedule(ws)


@jobs_app.command("run-queue")
def jobs_run_queue(
    max_cpu: Annotated[int, typer.Option(help="CPU jobs at once")] = 2,
    max_gpu: Annotated[int, typer.Option(help="GPU jobs at once")] = 1,
    until_idle: Annotated[bool, typer.Option(help="return when nothing is queued or running")] = True,
    workspace: WorkspaceOpt = None,
) -> None:
    """Start queued jobs under the concurrency limits, and keep doing so."""
    from core.jobs import run_queue

    run_queue(_ws(workspace), max_cpu=max_cpu, max_gpu=max_gpu, until_idle=until_idle)


@experiment_app.command("aninfonce")
def experiment_aninfonce(
    steps: Annotated[int | None, typer.Option(help="updates per loss")] = None,
    dim: Annotated[int | None, typer.Option(help="number of latents")] = None,
    seed: Annotated[int, typer.Option(help="seed of mixing, encoder, data")] = 0,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="any other config field key=value")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """InfoNCE vs AnInfoNCE on anisotropic synthetic latents: R^2 per latent and the learned Lambda."""
    from dataclasses import fields

    from core.experiments.aninfonce import AnInfoNCEExperimentConfig, run_and_record

    values: dict[str, Any] = {"seed": seed, **({"steps": steps} if steps else {}), **({"dim": dim} if dim else {})}
    values.update(_parse_options(option))
    known = {f.name for f in fields(AnInfoNCEExperimentConfig)}
    if set(values) - known:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(set(values) - known))}; known: {', '.join(sorted(known))}")
    try:
        cfg = AnInfoNCEExperimentConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    result = run_and_record(_ws(workspace), cfg, progress=sys.stderr.isatty())
    _print_table(result.table)
    typer.echo(f"run {result.run_id} ({result.seconds:.0f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in result.summary.items()))


@app.command()
def sql(query: str, workspace: WorkspaceOpt = None) -> None:
    """Run a read-only SQL query against the catalog and print the result."""
    ws = _ws(workspace, create=False)
    ws.catalog.check_version()
    import duckdb

    try:
        df = ws.catalog.query(query)
    except duckdb.Error as exc:
        raise ConfigError(f"SQL failed: {str(exc).splitlines()[0]}") from None
    _print_table(df)


@app.command()
def demo(
    workspace: WorkspaceOpt = None,
    size: Annotated[str, typer.Option(help="tiny | small | full")] = "small",
    seed: Annotated[int, typer.Option(help="seed of the demo world")] = 0,
    jobs: Annotated[bool, typer.Option("--jobs/--in-process",
                                       help="run each stage as a job (shown on the Runs page; the default) "
                                            "or all in this process")] = True,
    parallel: Annotated[int, typer.Option(help="stages run side by side as jobs when what they need is done")] = 2,
) -> None:
    """Build the demo world into the workspace and run every stage on it (idempotent, resumable).

    Each stage runs as a job by default, so the Runs page shows it with its log; Ctrl-C cancels the
    running stage, and running the command again resumes where it stopped.
    """
    from core.demo.pipeline import run_demo

    ws = _ws(workspace)
    if jobs:
        run_demo(ws, size=size, seed=seed, jobs=True, parallel=parallel, echo=typer.echo)
        return
    summary = run_demo(ws, size=size, seed=seed, progress=sys.stderr.isatty())
    for line in summary:
        typer.echo(line)


@app.command()
def serve(
    workspace: WorkspaceOpt = None,
    address: Annotated[str, typer.Option(help="address to bind; 127.0.0.1 keeps it local")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8501,
) -> None:
    """Serve the dashboard (binds to 127.0.0.1 unless told otherwise)."""
    ws = _ws(workspace)
    app_path = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    if not app_path.exists():
        raise PrunescopeError(f"dashboard entry point {app_path} not found (is prunescope installed from a checkout?)")
    env = dict(os.environ, PRUNESCOPE_WORKSPACE=str(ws.root))
    args = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    typer.echo(f"serving {ws.root} on http://{address}:{port}")
    # Streamlit reads .streamlit/config.toml from its working directory: run it from the checkout.
    raise typer.Exit(subprocess.call(args, env=env, cwd=app_path.parent.parent))


def main() -> None:
    """Console-script entry point: run the app, turning PrunescopeError into one line + exit code.

    Usage errors (missing arguments, bad flags) are handled by Typer itself (exit code 2).
    """
    try:
        app()
    except PrunescopeError as exc:
        typer.echo(f"error: {inert(exc.one_line())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a write outside core.atomic (a log line, a progress record) on a full disk
        from core.atomic import disk_full_error

        full = disk_full_error(exc)
        if full is None:
            raise
        typer.echo(f"error: {inert(full.one_line())}", err=True)
        sys.exit(full.exit_code)


if __name__ == "__main__":
    main()
