"""`imret` command line: each subcommand parses its arguments and calls one function.

Imports happen inside the commands, so `imret --help` is instant and the shard builder's worker processes
are forked before torch is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from imret.errors import ImretError, one_line


def cmd_data_synth(args: argparse.Namespace) -> None:
    from imret.data.synth import write_synth

    out = write_synth(args.out, images=args.images, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.images} images of {args.size} px to {out}")


def cmd_shards_build(args: argparse.Namespace) -> None:
    from imret.data.build import build_shards

    manifest = build_shards(args.src, args.format, args.out, val_fraction=args.val_fraction,
                            test_fraction=args.test_fraction, seed=args.seed,
                            samples_per_shard=args.samples_per_shard, max_side=args.max_side,
                            workers=args.workers, overwrite=args.overwrite, strict=args.strict,
                            require_masks=args.require_masks, engine=args.engine, address=args.address,
                            retries=args.retries, verify=args.verify)  # fmt: skip
    splits = manifest["splits"]
    counts = ", ".join(f"{splits[s]['samples']} {s}" for s in splits if s != "test" or splits[s]["samples"])
    print(f"{args.out}: {counts} samples in {sum(len(split['shards']) for split in splits.values())} shards; "
          f"{len(manifest['rejected'])} rejected")  # fmt: skip
    for reject in manifest["rejected"][:20]:
        print(f"  rejected {reject['source']}: {reject['reason']}")
    if len(manifest["rejected"]) > 20:
        print(f"  ... {len(manifest['rejected']) - 20} more in {args.out}/manifest.json")


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from imret.data.build import verify_shards

    problems = verify_shards(args.dir)
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(f"{args.dir}: {'ok' if not problems else f'{len(problems)} shard(s) differ from the manifest'}")
    return 1 if problems else 0


def cmd_shards_info(args: argparse.Namespace) -> None:
    from imret.data.build import describe_shards

    print(describe_shards(args.dir))


def cmd_recipe_show(args: argparse.Namespace) -> None:
    from imret.config import load_recipe, recipe_to_yaml

    print(recipe_to_yaml(load_recipe(args.recipe, args.set)), end="")


def cmd_train(args: argparse.Namespace) -> int:
    from imret.config import load_recipe
    from imret.train import Terminated, train

    try:
        train(load_recipe(args.recipe, args.set), debug=args.debug)
    except Terminated as exc:
        print(f"imret: {exc}; run the same command again to resume", file=sys.stderr)
        return 143
    return 0


def cmd_embed(args: argparse.Namespace) -> None:
    from imret.embed import embed

    out = embed(args.run_dir, args.shards, args.split, mask_with=args.mask_with, out=args.out,
                batch_size=args.batch_size, workers=args.workers, decode=args.decode, layer=args.layer)  # fmt: skip
    print(f"embeddings: {out}")


def cmd_index_build(args: argparse.Namespace) -> None:
    from imret.index import build_and_save

    print(build_and_save(args.emb_dir, kind=args.kind, device=args.device, float16=args.float16))


def cmd_search(args: argparse.Namespace) -> None:
    from imret.search import format_results, search_files

    results = search_files(args.index_dir, args.images, k=args.k, masked=args.masked, tags=args.tags)
    print(json.dumps(results, indent=1) if args.json else format_results(results))


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from imret.serve import serve
    except ImportError as exc:
        raise ImretError(f"imret serve needs {exc.name}: pip install -e '.[cpu,serve]'") from None

    serve(args.index_dirs, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, max_batch=args.max_batch)


def cmd_study(args: argparse.Namespace) -> None:
    from imret.study import load_study, run_study

    print(f"report: {run_study(load_study(args.recipe, args.set))}")


def cmd_demo(args: argparse.Namespace) -> None:
    import shlex

    from imret.study import demo

    report = demo(args.out, seed=args.seed)
    print(f"report: {report}")
    print(f"search its indexes in a browser: imret serve {shlex.quote(str(report.parent))}")


def cmd_bench(args: argparse.Namespace) -> None:
    from imret import bench

    out = Path(args.out) if args.out else None
    if args.what == "gpu":
        import torch

        from imret.bench_gpu import format_summary, run_gpu_bench

        if not torch.cuda.is_available():
            raise ImretError("imret bench gpu measures a CUDA GPU, and this machine has none visible")
        # each stage's progress (and, under --json, the summary) on stderr: stdout holds only the JSON object
        result = run_gpu_bench(torch.device("cuda"), out=out, echo=sys.stderr)
        print(format_summary(result), file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(result, indent=1))
        return
    if args.what == "scale":
        from imret.bench_scale import bench_scale

        result = bench_scale(tuple(int(n) for n in args.sizes.split(",")))
    elif args.what == "serve":
        from imret.bench_serve import run_serve_bench

        result = run_serve_bench(gallery=args.images or 100_000)
    else:
        result = bench.run(args.what, images=args.images or 2000, size=args.size, workers=args.workers)
    if out:
        out.write_text(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1) if args.json else bench.format_result(result))


def cmd_doctor(args: argparse.Namespace) -> int:
    from imret.doctor import as_json, format_checks, run_checks

    checks = run_checks()
    print(json.dumps(as_json(checks), indent=1) if args.json else format_checks(checks))
    return 1 if any(check.status == "error" for check in checks) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imret", description="Train and compare apparel image-retrieval models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="write the embedded synthetic apparel dataset (folder layout)")
    synth.add_argument("out", metavar="OUT")
    synth.add_argument("--images", type=int, default=2000)
    synth.add_argument("--size", type=int, default=96, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    synth.set_defaults(func=cmd_data_synth)

    shards = commands.add_parser("shards", help="WebDataset shards").add_subparsers(dest="action", required=True)
    build = shards.add_parser("build", help="turn a dataset into shards + manifest.json")
    build.add_argument("src", metavar="SRC")
    build.add_argument("--format", required=True, choices=["folder", "imaterialist", "ccp"])
    build.add_argument("--out", required=True, metavar="LOCATION", help="a directory, or a URL: s3://bucket/prefix, gs://...")
    build.add_argument("--val-fraction", type=float, default=0.1, help="chooses each model's epoch and threshold")
    build.add_argument("--test-fraction", type=float, default=0.0,
                       help="a held-out test split, for the study's queries (default 0: none)")
    build.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--max-side", type=int, default=None, metavar="PX", help="downscale larger images")
    build.add_argument("--workers", type=int, default=None,
                       help="--engine local: processes, each writing one shard at a time (default: every core this process may use)")
    build.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this machine's process pool; ray: one task a shard on a Ray cluster (pip install -e '.[ray]')")
    build.add_argument("--address", metavar="HOST:PORT", help="--engine ray: the cluster to join (default: RAY_ADDRESS, "
                       "else a local Ray instance)")  # fmt: skip
    build.add_argument("--retries", type=int, default=3, help="tries a failed shard gets again before the build stops")
    build.add_argument("--verify", action="store_true", help="re-hash finished shards before skipping them (default: sizes)")
    build.add_argument("--overwrite", action="store_true", help="replace a finished build in DIR")
    build.add_argument("--strict", action="store_true", help="fail, writing no manifest, if any sample is rejected")
    build.add_argument("--require-masks", action="store_true", help="reject samples that have no mask")
    build.set_defaults(func=cmd_shards_build)
    verify = shards.add_parser("verify", help="re-hash every shard against the manifest")
    verify.add_argument("dir", metavar="LOCATION", help="a shard directory or URL")
    verify.set_defaults(func=cmd_shards_verify)
    info = shards.add_parser("info", help="summarise a shard build")
    info.add_argument("dir", metavar="LOCATION", help="a shard directory or URL")
    info.set_defaults(func=cmd_shards_info)

    recipe = commands.add_parser("recipe", help="recipes").add_subparsers(dest="action", required=True)
    show = recipe.add_parser("show", help="print the fully resolved recipe")
    show.add_argument("recipe", metavar="RECIPE")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    show.set_defaults(func=cmd_recipe_show)

    train = commands.add_parser("train", help="train a model (also under accelerate launch / torchrun)")
    train.add_argument("recipe", metavar="RECIPE")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--debug", action="store_true", help="one process, 2 short epochs, timings and shapes")
    train.set_defaults(func=cmd_train)

    embed = commands.add_parser("embed", help="embed a split with a trained model (also under accelerate launch)")
    embed.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or imagenet-resnet18")
    embed.add_argument("--shards", required=True, metavar="LOCATION", help="a shard directory or URL")
    embed.add_argument("--split", required=True, choices=["train", "val", "test"])
    embed.add_argument("--mask-with", metavar="SEG_RUN_DIR", help="zero the background with this U-Net's masks")
    embed.add_argument("--out", metavar="DIR", help="default: RUN_DIR/embeddings/<split>[-masked-<seg run>]")
    embed.add_argument("--batch-size", type=int, default=128)
    embed.add_argument("--workers", type=int, help="decoding processes per rank (default: its share of the cores, at most 8)")
    embed.add_argument("--layer", choices=["pooled", "head"], help="embed with this layer instead of the declared one")
    embed.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",
                       help="where JPEGs are decoded (gpu: nvJPEG on the device; auto: gpu on CUDA, else cpu)")
    embed.set_defaults(func=cmd_embed)

    index = commands.add_parser("index", help="FAISS index").add_subparsers(dest="action", required=True)
    index_build = index.add_parser("build", help="index an embedding directory (EMB_DIR/index.faiss + sidecar)")
    index_build.add_argument("emb_dir", metavar="EMB_DIR")
    index_build.add_argument("--kind", choices=["flat", "ivfpq"], default="flat")
    index_build.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                             help="auto: every GPU when there are CUDA GPUs (FAISS must have GPU support), else the CPU")
    index_build.add_argument("--float16", action="store_true", help="store vectors in half precision (flat: half the memory)")
    index_build.set_defaults(func=cmd_index_build)

    search = commands.add_parser("search", help="the nearest gallery images of any image (an index directory)")
    search.add_argument("index_dir", metavar="INDEX_DIR", help="an index directory (imret index build, or a study's "
                        "OUT/embeddings/<model>/<variant>-train)")  # fmt: skip
    search.add_argument("images", nargs="+", metavar="IMAGE")
    search.add_argument("--k", type=int, default=5, help="neighbours per image")
    search.add_argument("--masked", action="store_true",
                        help="zero the background with the index's segmentation run (a masked index needs it)")
    search.add_argument("--tags", metavar="A;B", help="the query's tags: each neighbour's label IoU with them")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    serve = commands.add_parser("serve", help="the search page and its HTTP API")
    serve.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR",
                       help="index directories, or a study's output directory (every model, original and masked)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to answer other machines")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument("--max-upload-mb", type=float, default=8.0, help="larger uploads get a 413")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="queries embedded in one forward pass at most (1: one at a time, no batching)")
    serve.set_defaults(func=cmd_serve)

    study = commands.add_parser("study", help="run every stage of a study recipe, skipping finished ones")
    study.add_argument("recipe", metavar="RECIPE")
    study.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    study.set_defaults(func=cmd_study)

    demo = commands.add_parser("demo", help="the study on the embedded synthetic data, on the CPU")
    demo.add_argument("--out", default="demo", metavar="DIR")
    demo.add_argument("--seed", type=int, default=0, help="seeds training and the queries; the data stay the same")
    demo.set_defaults(func=cmd_demo)

    bench = commands.add_parser("bench", help="measure throughput against a plain baseline")
    bench.add_argument("what", choices=["loader", "train", "embed", "faiss", "build", "gpu", "scale", "serve"],
                       help="gpu: every GPU figure in one run, under 5 minutes (its sizes are fixed); scale: merge, "
                            "index, score and opening the index (memory-mapped, and read whole) at growing gallery "
                            "sizes, time and memory; serve: imret serve under 1, 8 and 32 concurrent clients")  # fmt: skip
    bench.add_argument("--images", type=int, help="dataset size (loader, default 2000) or gallery size (faiss: 2000, "
                       "serve: 100000)")  # fmt: skip
    bench.add_argument("--size", type=int, default=96, help="side of the images the loader yields")
    bench.add_argument("--workers", type=int, default=2)
    bench.add_argument("--sizes", default="100000,1000000,10000000", help="scale: gallery sizes, comma-separated")
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout (gpu: its summary on stderr)")
    bench.add_argument("--out", metavar="FILE", help="also write the figures here as JSON lines (gpu: one a stage, "
                       "as each is measured)")  # fmt: skip
    bench.set_defaults(func=cmd_bench)

    doctor = commands.add_parser("doctor", help="check this machine: Python, torch, CUDA, GPUs, NCCL, nvJPEG, FAISS, ...")
    doctor.add_argument("--json", action="store_true", help='{"checks": [{"name", "status", "detail", "fix"}]}')
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried: noise on every command
    for chatty in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # "found credentials in ..." on every connection
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except ImretError as exc:
        print(f"imret: error: {one_line(exc)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("imret: interrupted", file=sys.stderr)
        return 130
    if release_process_group() and argv is None:  # main([...]) called from Python leaves the exit to its caller
        exit_without_teardown(code)
    return code


def exit_without_teardown(code: int) -> NoReturn:
    """Ends a process that ran collectives, skipping the interpreter's teardown. DDP keeps a reference to its gloo
    process group that destroy_process_group cannot drop (torch 2.14), so gloo's worker threads outlive it; one
    still freeing the last collective's tensors when the interpreter starts finalising needs the GIL, gets
    pthread_exit instead, and the process aborts (SIGABRT, "terminate called without an active exception") after
    a run that succeeded: 2 in 35 2-rank runs on 2 loaded cores. Everything is written and closed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def release_process_group() -> bool:
    """Destroy the process group, if this command had one; says whether it did. Not done after an interrupt,
    which may leave a collective in flight."""
    if "torch" not in sys.modules:  # keeps `imret --help` and the data commands free of torch
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
