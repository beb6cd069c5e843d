"""`imret` command line: each subcommand parses its arguments and calls one function.

Imports happen inside the commands, so `imret --help` is instant and the shard builder's worker processes
are forked before torch is loaded.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from imret.errors import ImretError, one_line, write_failed


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


def cmd_recipe_list(args: argparse.Namespace) -> None:
    from imret.shipped import list_shipped

    shipped = list_shipped()
    width = max(len(name) for name, _ in shipped)
    for name, description in shipped:
        print(f"{name:{width}s}  {description}")


def cmd_recipe_copy(args: argparse.Namespace) -> None:
    from imret.shipped import copy_shipped

    written = copy_shipped(args.name, args.dest, overwrite=args.overwrite)
    print(f"copied {len(written)} file(s) under {args.dest}" + (f": {written[0]}" if len(written) == 1 else ""))


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

    results = search_files(args.index_dir, args.images, k=args.k, masked=args.masked, tags=args.tags, model=args.model)
    print(json.dumps(results, indent=1) if args.json else format_results(results))


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from imret.serve import serve
    except ImportError as exc:
        raise ImretError(f"imret serve needs {exc.name}: pip install -e '.[cpu,serve]'") from None

    serve(args.index_dirs, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, max_batch=args.max_batch)


def cmd_study(args: argparse.Namespace) -> None:
    from imret.study import load_study, run_study

    print(f"report: {run_study(load_study(args.recipe, args.set), debug=args.debug, train_sets=args.train_set)}")


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


def add_command(commands, name: str, summary: str, examples: list[str], func=None) -> argparse.ArgumentParser:
    """A command or subcommand whose --help says what it does (its one-line summary, also in its parent's list) and
    how it is typed (examples, as README gives them)."""
    parser = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                 epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imret", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Train and compare apparel image-retrieval models.",
                                     epilog="start here:\n  imret demo\n  imret doctor\n  imret COMMAND --help")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = add_command(commands, "data", "datasets: draw the embedded synthetic one",
                       ["imret data synth data/synth --images 2000 --size 96 --seed 0"]).add_subparsers(dest="action", required=True)  # fmt: skip
    synth = add_command(data, "synth", "write the embedded synthetic apparel dataset (folder layout)",
                        ["imret data synth data/synth --images 2000 --size 96 --seed 0"], cmd_data_synth)  # fmt: skip
    synth.add_argument("out", metavar="OUT")
    synth.add_argument("--images", type=int, default=2000)
    synth.add_argument("--size", type=int, default=96, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")

    shards = add_command(commands, "shards", "WebDataset shards: build them from a dataset, verify them, describe them",
                         ["imret shards build data/synth --format folder --out shards/synth",
                          "imret shards verify shards/synth"]).add_subparsers(dest="action", required=True)  # fmt: skip
    build = add_command(shards, "build", "turn a dataset into shards and manifest.json, on this machine or a Ray "
                        "cluster; run it again to resume a stopped build", [
                            "imret shards build data/synth --format folder --out shards/synth",
                            "imret shards build ~/data/imaterialist --format imaterialist --out s3://datasets/imat "
                            "--max-side 320 --engine ray --address head-node:6379"], cmd_shards_build)  # fmt: skip
    build.add_argument("src", metavar="SRC", help="the dataset: a directory, or a URL (s3://...)")
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
    verify = add_command(shards, "verify", "re-hash every shard against the manifest; exit 1 on any mismatch",
                         ["imret shards verify shards/synth"], cmd_shards_verify)  # fmt: skip
    verify.add_argument("dir", metavar="LOCATION", help="a shard directory or URL")
    info = add_command(shards, "info", "summarise a shard build: classes, counts, sizes, rejects",
                       ["imret shards info shards/synth"], cmd_shards_info)  # fmt: skip
    info.add_argument("dir", metavar="LOCATION", help="a shard directory or URL")

    recipe = add_command(commands, "recipe", "recipes: the shipped ones, where to edit them, and any one resolved",
                         ["imret recipe list", "imret recipe copy all my-study",
                          "imret recipe show recipes/finetune.yaml"]).add_subparsers(dest="action", required=True)  # fmt: skip
    show = add_command(recipe, "show", "print a recipe fully resolved, every default filled in",
                       ["imret recipe show recipes/finetune.yaml --set optim.lr=1e-3 --set data.workers=8"], cmd_recipe_show)  # fmt: skip
    show.add_argument("recipe", metavar="RECIPE")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    add_command(recipe, "list", "list the recipes and launch configs that ship with imret", ["imret recipe list"],
                cmd_recipe_list)  # fmt: skip
    copy = add_command(recipe, "copy", "copy shipped recipes and launch configs where you edit them (DEST/recipes/, "
                       "DEST/launch/)", ["imret recipe copy all my-study && cd my-study && imret study recipes/study.yaml --debug",
                                         "imret recipe copy finetune ."], cmd_recipe_copy)  # fmt: skip
    copy.add_argument("name", metavar="NAME", help="a name from imret recipe list (finetune, demo/study, launch/cpu), or all")
    copy.add_argument("dest", metavar="DEST")
    copy.add_argument("--overwrite", action="store_true", help="replace files already in DEST")

    train = add_command(commands, "train", "train a model from a recipe (also under accelerate launch or torchrun; "
                        "run it again to resume)", ["imret train recipes/scratch-aug.yaml --debug --set data.shards=shards/synth",
                                                    "accelerate launch -m imret train recipes/finetune.yaml"], cmd_train)  # fmt: skip
    train.add_argument("recipe", metavar="RECIPE")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--debug", action="store_true", help="one process, 2 short epochs, timings and shapes")

    embed = add_command(commands, "embed", "embed a split of the shards with a trained model (also under accelerate "
                        "launch)", ["imret embed runs/finetune --shards shards/imaterialist --split train"], cmd_embed)  # fmt: skip
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

    index = add_command(commands, "index", "FAISS indexes of embeddings",
                        ["imret index build runs/finetune/embeddings/train"]).add_subparsers(dest="action", required=True)  # fmt: skip
    index_build = add_command(index, "build", "index an embedding directory (EMB_DIR/index.faiss and its sidecar)",
                              ["imret index build runs/finetune/embeddings/train --kind ivfpq"], cmd_index_build)  # fmt: skip
    index_build.add_argument("emb_dir", metavar="EMB_DIR")
    index_build.add_argument("--kind", choices=["flat", "ivfpq"], default="flat")
    index_build.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                             help="auto: every GPU when there are CUDA GPUs (FAISS must have GPU support), else the CPU")
    index_build.add_argument("--float16", action="store_true", help="store vectors in half precision (flat: half the memory)")

    search = add_command(commands, "search", "the nearest gallery images of any image, from an index directory or a "
                         "study's folder", ["imret search demo/study photo.jpg",
                                            'imret search demo/study photo.jpg --model "classifier from scratch" --masked --json'],
                         cmd_search)  # fmt: skip
    search.add_argument("index_dir", metavar="INDEX_DIR|STUDY_DIR",
                        help="an index directory (imret index build), or a study's output directory (as imret serve takes)")
    search.add_argument("images", nargs="+", metavar="IMAGE")
    search.add_argument("--model", metavar="NAME", help="a study's row (default: its best by mean label IoU)")
    search.add_argument("--k", type=int, default=5, help="neighbours per image")
    search.add_argument("--masked", action="store_true",
                        help="the masked index: zero the background with its segmentation run first")
    search.add_argument("--tags", metavar="A;B", help="the query's tags: each neighbour's label IoU with them")
    search.add_argument("--json", action="store_true", help="the neighbours and the index that answered, as JSON")

    serve = add_command(commands, "serve", "the search page and its HTTP API over index directories or a study's folder",
                        ["imret serve demo/study", "imret serve runs/finetune/embeddings/train --port 8080"], cmd_serve)  # fmt: skip
    serve.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR",
                       help="index directories, or a study's output directory (every model, original and masked)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to answer other machines")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument("--max-upload-mb", type=float, default=8.0, help="larger uploads get a 413")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="queries embedded in one forward pass at most (1: one at a time, no batching)")

    study = add_command(commands, "study", "run every stage of a study recipe (shards, training, embedding, indexes, "
                        "scores, report), skipping finished ones", ["imret study recipes/study.yaml --debug",
                                                                    "imret study recipes/study.yaml --train-set data.workers=8"],
                        cmd_study)  # fmt: skip
    study.add_argument("recipe", metavar="RECIPE")
    study.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="a study setting; lists in YAML flow style: --set 'train.overrides=[a.b=1, c.d=2]'")
    study.add_argument("--train-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="a setting of every training recipe, after train.overrides")
    study.add_argument("--debug", action="store_true", help="a smoke run: every stage at debug sizes on a sample of "
                       "the source, in <study.out>-debug/")  # fmt: skip

    demo = add_command(commands, "demo", "the whole study on the embedded synthetic data, on the CPU, in minutes",
                       ["imret demo --out demo --seed 1"], cmd_demo)  # fmt: skip
    demo.add_argument("--out", default="demo", metavar="DIR")
    demo.add_argument("--seed", type=int, default=0, help="seeds training and the queries; the data stay the same")

    bench = add_command(commands, "bench", "measure throughput against a plain baseline in the same run",
                        ["imret bench loader --workers 2 --size 96", "imret bench gpu --json --out bench-gpu.jsonl"],
                        cmd_bench)  # fmt: skip
    bench.add_argument("what", choices=["loader", "train", "embed", "faiss", "build", "gpu", "scale", "serve"],
                       help="gpu: every GPU figure in one run, under 4 minutes (its sizes are fixed); build: the local "
                            "pool against Ray; scale: merge, index, score and opening the index at growing gallery "
                            "sizes; serve: imret serve under 1, 8 and 32 concurrent clients")  # fmt: skip
    bench.add_argument("--images", type=int, help="dataset size (loader, build: default 2000) or gallery size (faiss: "
                       "2000, serve: 100000)")  # fmt: skip
    bench.add_argument("--size", type=int, default=96, help="image side (loader: what it yields; build: the photos')")
    bench.add_argument("--workers", type=int, default=2)
    bench.add_argument("--sizes", default="100000,1000000,10000000", help="scale: gallery sizes, comma-separated")
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout (gpu: its summary on stderr)")
    bench.add_argument("--out", metavar="FILE", help="also write the figures here as JSON lines (gpu: one a stage, "
                       "as each is measured)")  # fmt: skip

    doctor = add_command(commands, "doctor", "check this machine for imret: Python, torch, CUDA, each GPU, NCCL, "
                         "nvJPEG, FAISS and its GPU probe, shared memory, cores, accelerate, W&B",
                         ["imret doctor", "imret doctor --json"], cmd_doctor)  # fmt: skip
    doctor.add_argument("--json", action="store_true", help='{"checks": [{"name", "status", "detail", "fix"}]}')
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
    except BrokenPipeError:  # `imret recipe list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk under a write imret does not wrap itself (a plot, a log line): still one line, with the file
        failed = write_failed(exc.filename, exc) if exc.filename else ImretError(f"a write failed: {exc.strerror}")
        print(f"imret: error: {one_line(failed)}", file=sys.stderr)
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
