"""The `seeds-tf` command line: the same core as the DEEPaaS API, for local work.

    seeds-tf train --epochs 10 --image_size 299      # flags generated from etc/config.yaml
    seeds-tf predict seed1.jpg seed2.png --top_k 3
    seeds-tf identify photos/ --output answers.csv   # a whole collection; rerun to resume
    seeds-tf demo                                    # the demo run, trained if models/ has none
    seeds-tf synthetic data/synthetic_seeds          # the synthetic seeds dataset
    seeds-tf runs                                    # working runs, their test metrics; broken, interrupted
    seeds-tf check-dataset                           # a report on a dataset before training
    seeds-tf evaluate 2026-11-21_215742 other.txt    # a run on another labelled split
    seeds-tf import-legacy seeds.tar.xz              # the original service's published seeds model
    seeds-tf export 2026-11-21_215742 --format tflite --precision int8 --serve   # a faster engine, timed
    seeds-tf calibrate 2026-11-21_215742 --split val # temperature and decision thresholds
    seeds-tf index 2026-11-21_215742                 # the reference specimens behind each answer
    seeds-tf healthcheck                             # exit 1 when the service cannot predict in time
    seeds-tf promote 2026-11-21_215742               # the run served when a request names none

Mistakes in the input end with a message naming the argument and exit status 2; a failure found
later (an unhealthy service, an identify job of which every image failed) with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path

from seeds_tf import __version__
from seeds_tf.classifier import engines
from seeds_tf.core import config, runs, startup
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    roots = Roots.from_env()
    roots = Roots(
        data=Path(args.data_dir).resolve() if args.data_dir else roots.data,
        models=Path(args.models_dir).resolve() if args.models_dir else roots.models,
    )
    try:
        result = args.command(args, roots)
    except InputError as error:
        print(f"seeds-tf: error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _train(args: argparse.Namespace, roots: Roots):
    from seeds_tf.learning import preflight

    names = [name for section in config.RUN_SECTIONS for name in config.option_specs(section)]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    run_config = config.RunConfig.from_options(**overrides)
    with runs.storage_errors(roots.models):
        preflight.check(run_config, roots)  # before TensorFlow loads: a mistake is told at once

    startup.import_tensorflow()
    from seeds_tf.hosting import admission, monitor
    from seeds_tf.learning import distribute, training

    # The chief alone holds the reservation, as it alone takes the training lock.
    with admission.reserved(roots.models) if distribute.is_chief() else contextlib.nullcontext():
        monitor.ensure_from_env(roots.models)
        return training.train(run_config, roots).to_dict()


def _predict(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.data import sources
    from seeds_tf.prediction import inference

    options = config.load(
        config.PredictConfig, **{name: getattr(args, name) for name in config.option_specs("prediction")}
    )
    files, urls, data_uris = [], [], []
    for source in args.images:
        if source.startswith(("http://", "https://")):
            urls.append(source)
        elif source.startswith("data:"):
            data_uris.append(source)
        else:
            try:
                files.append((source, Path(source).read_bytes()))
            except OSError as error:
                raise InputError("images", f"cannot read {source!r}: {error.strerror}") from None
    uploads = sources.gather_images(
        files, " ".join(urls), " ".join(data_uris), sources.FetchPolicy.from_env()
    )
    cache = inference.RunCache()
    if args.heatmap:
        from seeds_tf.prediction import explain

        _write_heatmap(Path(args.heatmap), explain.explain_request(roots, cache, options, uploads))
    return inference.predict(roots, cache, options, uploads)


def _write_heatmap(path: Path, png: bytes) -> None:
    """Writes the heatmap, making its folder when missing, as `identify --output` and deepaas-cli's
    `--deepaas_method_output` do; a path that cannot be written is the user's mistake.

    Raises:
        InputError: naming `heatmap`, with the reason the system gives.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    except OSError as error:
        raise InputError("heatmap", f"cannot write {str(path)!r}: {error.strerror}") from None


def _identify(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.prediction import batch

    options = batch.IdentifyOptions(
        timestamp=args.run,
        engine=args.engine,
        top_k=args.top_k,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
    )
    answerer = None
    if args.ray:
        from seeds_tf.prediction import batch_ray

        answerer = batch_ray.ray_answerer(args.ray, roots.models, args.ray_cpus_per_worker)
    summary = batch.identify(roots, args.input, args.output, options, answerer)
    if summary.answered_none:  # a script must not take a job that answered nothing for done
        print(json.dumps(summary.to_dict(), indent=2))
        print(
            f"seeds-tf: error: every one of the {summary.failed} images failed: "
            f"see the error column of {str(args.output)!r}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return summary.to_dict()


def _demo(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.learning import demo

    run_id = demo.train_demo_run(roots) if args.force else demo.ensure_demo_run(roots)
    return {"run_id": run_id}


def _synthetic(args: argparse.Namespace, roots: Roots):
    from seeds_tf.data import synthetic

    splits_dir = synthetic.generate_dataset(
        args.output,
        images_per_class=args.images_per_class,
        image_size=args.image_size,
        seed=args.seed,
        held_out_species=args.held_out_species,
        non_seed_images=args.non_seed_images,
    )
    return {"splits_directory": str(splits_dir)}


def _check_dataset(args: argparse.Namespace, roots: Roots):
    from seeds_tf.data import datasets

    images_dir = roots.data_path(args.images_directory, "images_directory")
    splits_dir = None if args.folders else roots.data_path(args.splits_directory, "splits_directory")
    report = datasets.check_dataset(splits_dir, images_dir)
    print(report.summary(), file=sys.stderr)
    if args.json:
        return report.to_dict()
    if not report.ok:
        raise InputError("dataset", "problems found; see the report above")
    return None


def _evaluate(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.learning import evaluation

    return evaluation.evaluate_run(roots, args.run, Path(args.split_file), args.batch_size).to_dict()


def _import_legacy(args: argparse.Namespace, roots: Roots):
    # TensorFlow loads once the tarball is verified: legacy imports it through startup itself.
    from seeds_tf.learning import legacy

    return {"run_id": legacy.import_legacy(args.source, roots, sha256=args.sha256)}


def _export(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.prediction import export

    spec = engines.export_spec(args.format, args.precision)
    return export.export_run(roots, args.run, spec, serve=args.serve)


def _calibrate(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.learning import calibrate

    fitted = calibrate.calibrate_run(roots, args.run, args.split, args.target_precision, args.batch_size)
    return fitted.to_dict()


def _index(args: argparse.Namespace, roots: Roots):
    startup.import_tensorflow()
    from seeds_tf.learning import indexing

    return {"index": str(indexing.index_run(roots, args.run, args.batch_size))}


def _promote(args: argparse.Namespace, roots: Roots):
    return runs.promote(roots.models, args.run)


def _healthcheck(args: argparse.Namespace, roots: Roots):
    from seeds_tf.hosting import health

    problem = health.check_service(args.url, args.timeout)
    if problem is not None:
        print(f"seeds-tf: unhealthy: {problem}", file=sys.stderr)
        raise SystemExit(1)


def _runs(args: argparse.Namespace, roots: Roots):
    listing = runs.list_runs(roots.models)
    return {
        "runs": list(listing.working.values()),
        "broken": listing.broken_list(),
        "interrupted": runs.interrupted_runs(roots.models),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seeds-tf", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"seeds_tf {__version__}")
    parser.add_argument("--data-dir", help=f"data folder (default: ${DATA_ENV} or ./data)")
    parser.add_argument("--models-dir", help=f"models folder (default: ${MODELS_ENV} or ./models)")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a new run into the models folder")
    for section in config.RUN_SECTIONS:
        group = train.add_argument_group(f"{section} options (defaults from etc/config.yaml)")
        for spec in config.option_specs(section).values():
            _add_option(group, spec)
    train.set_defaults(command=_train)

    predict = commands.add_parser("predict", help="name the species in seed photos")
    predict.add_argument("images", nargs="+", help="image files, http(s) URLs or data URIs")
    predict.add_argument(
        "--heatmap",
        help="also write the images with their Grad-CAM heatmaps to this PNG (its folder is made)",
    )
    for spec in config.option_specs("prediction").values():
        _add_option(predict, spec, use_default=True)
    predict.set_defaults(command=_predict)

    identify = commands.add_parser(
        "identify",
        help="name the species in a whole collection: a folder, list or CSV manifest in, CSV or JSONL out",
    )
    identify.add_argument(
        "input",
        type=Path,
        help="a folder (recursively), a list file (a path or URL a line) or a CSV with a path or url column",
    )
    identify.add_argument(
        "--output",
        type=Path,
        required=True,
        help="a .csv or .jsonl file; rerunning resumes it and retries failures",
    )
    identify.add_argument("--run", default="", help="run id (default: the promoted run, else the newest)")
    identify.add_argument("--engine", default="auto", choices=["auto", *engines.ENGINES])
    identify.add_argument("--top-k", type=int, default=5, help="species and genera per image (default: 5)")
    identify.add_argument("--batch-size", type=int, default=64, help="images per engine call (default: 64)")
    identify.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        help="rows per part file: the most a kill loses (default: 1024)",
    )
    identify.add_argument(
        "--ray",
        default="",
        metavar="ADDRESS",
        help="run on this Ray cluster (host:port, or auto) with Ray Data",
    )
    identify.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs of each Ray worker, which loads the run once (default: 1)",
    )
    identify.set_defaults(command=_identify)

    demo = commands.add_parser("demo", help="make sure a run exists, training the demo run if not")
    demo.add_argument("--force", action="store_true", help="train the demo run even if runs exist")
    demo.set_defaults(command=_demo)

    synthetic = commands.add_parser("synthetic", help="write the synthetic seeds dataset")
    synthetic.add_argument("output", type=Path, help="folder to write images/ and dataset_files/ to")
    synthetic.add_argument("--images-per-class", type=int, default=100)
    synthetic.add_argument("--image-size", type=int, default=128)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument(
        "--held-out-species",
        type=int,
        default=0,
        help="species left out of the classes, under unseen/species",
    )
    synthetic.add_argument(
        "--non-seed-images",
        type=int,
        default=0,
        help="photos without a seed per kind, under unseen/not_seeds",
    )
    synthetic.set_defaults(command=_synthetic)

    check = commands.add_parser(
        "check-dataset", help="report on a dataset before training: counts, unreadable files, duplicates"
    )
    check.add_argument(
        "--images_directory", default=config.option_specs("training")["images_directory"].default
    )
    check.add_argument(
        "--splits_directory", default=config.option_specs("training")["splits_directory"].default
    )
    check.add_argument("--folders", action="store_true", help="one sub-folder per class, no split files")
    check.add_argument("--json", action="store_true", help="print the full report as JSON")
    check.set_defaults(command=_check_dataset)

    evaluate = commands.add_parser("evaluate", help="evaluate a run on a split file; writes its reports")
    evaluate.add_argument("run", help="run id (YYYY-mm-dd_HHMMSS)")
    evaluate.add_argument("split_file", help="split file: '<path relative to the images folder> <label id>'")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.set_defaults(command=_evaluate)

    _add_run_commands(commands)
    return parser


def _add_run_commands(commands) -> None:
    """The commands about runs and the running service: import, export, list, health."""
    importer = commands.add_parser(
        "import-legacy", help="import a run of the original service (e.g. the published seeds model)"
    )
    importer.add_argument("source", help="path or http(s) URL of the run tarball, e.g. seeds.tar.xz")
    importer.add_argument(
        "--sha256", default="", help="refuse the tarball unless its SHA-256 is this (64 hex digits)"
    )
    importer.set_defaults(command=_import_legacy)

    exporter = commands.add_parser(
        "export", help="export a run to TensorFlow Lite, ONNX or a SavedModel, and check it against Keras"
    )
    exporter.add_argument("run", help="run id (YYYY-mm-dd_HHMMSS)")
    exporter.add_argument("--format", default="tflite", choices=engines.FORMATS)
    exporter.add_argument(
        "--precision",
        default="fp32",
        choices=engines.PRECISIONS,
        help="int8: weights and activations, calibrated on the run's training images; bf16: bfloat16 "
        "compute for CPUs with AVX512-BF16 or AMX; the exports: "
        + ", ".join(spec.name for spec in engines.EXPORTS),
    )
    exporter.add_argument(
        "--serve",
        action="store_true",
        help="refuse the export if it agrees with Keras on < 99%%, and measure now which engine "
        "engine=auto runs on this CPU (else measured at the run's first load on each CPU)",
    )
    exporter.set_defaults(command=_export)

    calibrator = commands.add_parser(
        "calibrate",
        help="fit the run's temperature and decision thresholds on a labelled split (e.g. your own images)",
    )
    calibrator.add_argument("run", help="run id (YYYY-mm-dd_HHMMSS)")
    calibrator.add_argument(
        "--split",
        default="val",
        help="val (default), train, test, or a split file of your own labelled images",
    )
    calibrator.add_argument(
        "--target_precision",
        type=float,
        default=config.option_specs("training")["target_precision"].default,
        help="precision the trusted answers should reach (default: %(default)s)",
    )
    calibrator.add_argument("--batch-size", type=int, default=32)
    calibrator.set_defaults(command=_calibrate)

    indexer = commands.add_parser(
        "index", help="embed the run's training images: the reference specimens shown by neighbours=k"
    )
    indexer.add_argument("run", help="run id (YYYY-mm-dd_HHMMSS)")
    indexer.add_argument("--batch-size", type=int, default=32)
    indexer.set_defaults(command=_index)

    promoter = commands.add_parser(
        "promote", help="make a run the one served when a request names none (recorded in the models folder)"
    )
    promoter.add_argument("run", help="run id (YYYY-mm-dd_HHMMSS)")
    promoter.set_defaults(command=_promote)

    checker = commands.add_parser(
        "healthcheck", help="exit 0 when the running service answers a real prediction in time, else 1"
    )
    checker.add_argument(
        "--url", default="", help="the service (default: $SEEDS_TF_HEALTHCHECK_URL or :5000)"
    )
    checker.add_argument(
        "--timeout", type=_positive_seconds, default=30.0, help="seconds to wait for the answer (> 0)"
    )
    checker.set_defaults(command=_healthcheck)

    listing = commands.add_parser(
        "runs",
        help="list the working runs with their test metrics, the broken runs with the reason, and the "
        "interrupted runs (to finish with train --resume)",
    )
    listing.set_defaults(command=_runs)


def _positive_seconds(text: str) -> float:
    """A finite number of seconds above 0: requests refuses any other timeout with a traceback."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0. Received: {text!r}")
    return seconds


def _add_option(parser, spec: config.OptionSpec, use_default: bool = False) -> None:
    """One flag per option, typed and documented as in etc/config.yaml. Unset flags stay None, so
    only what the user gave overrides the config."""
    kwargs = {
        "help": f"{spec.help} (default: {spec.default!r})".replace("%", "%%"),
        "default": spec.default if use_default else None,
    }
    if spec.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = spec.type
        if spec.choices is not None:
            kwargs["choices"] = list(spec.choices)
    parser.add_argument(f"--{spec.name}", **kwargs)


if __name__ == "__main__":
    sys.exit(main())
