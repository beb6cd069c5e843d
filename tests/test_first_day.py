"""A user's first day: imret installed from a wheel (not the checkout), the shipped recipes copied where they are
edited, every command's --help, a smoke run of the real study recipe on a small iMaterialist-format set, and the
study's settings reached from the command line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imret.cli import build_parser, main
from imret.config import load_recipe
from imret.data.synth import CLASSES, render_scene
from imret.study import StudyRecipe

ROOT = Path(__file__).resolve().parents[1]


def run(command, cwd, env=None, timeout=300):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_built_wheel_runs_without_the_checkout_and_ships_every_recipe(tmp_path):
    """Built as a user would (`pip wheel`), installed beside this environment with --target (not a venv: that would
    download torch), imported from there with the checkout nowhere on the path."""
    source = tmp_path / "source"  # a copy, so that the build's own files stay out of the checkout
    files = run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(tmp_path / "wheel")], source)  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("imret_toolkit-*.whl")
    installed = run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    where = run([sys.executable, "-c", "import imret, imret.study; print(imret.__file__); print(imret.study.demo.__module__)"], empty, env)
    assert where.stdout.startswith(str(tmp_path / "site" / "imret")), where.stdout + where.stderr
    helped = run([sys.executable, "-m", "imret", "demo", "--help"], empty, env)
    assert helped.returncode == 0 and "examples:" in helped.stdout and "imret demo --out demo" in helped.stdout
    demo_recipes = run([sys.executable, "-c", "from imret.shipped import shipped_root; print(shipped_root())"], empty, env)
    assert demo_recipes.stdout.strip() == str(tmp_path / "site" / "imret")  # imret demo reads them from the package
    copied = run([sys.executable, "-m", "imret", "recipe", "copy", "all", "mine"], empty, env)
    assert copied.returncode == 0, copied.stderr
    for folder in ("recipes", "recipes/demo", "launch"):
        expected = sorted(p.name for p in (ROOT / folder).glob("*.yaml"))
        assert sorted(p.name for p in (empty / "mine" / folder).glob("*.yaml")) == expected and expected
        assert all((empty / "mine" / folder / n).read_bytes() == (ROOT / folder / n).read_bytes() for n in expected)


def test_recipe_copy_keeps_what_is_there_and_names_the_shipped_ones(tmp_path, capsys):
    assert main(["recipe", "copy", "finetune", str(tmp_path)]) == 0
    assert (tmp_path / "recipes" / "finetune.yaml").read_text() == (ROOT / "recipes" / "finetune.yaml").read_text()
    (tmp_path / "recipes" / "finetune.yaml").write_text("# my edits\n")
    capsys.readouterr()
    assert main(["recipe", "copy", "all", str(tmp_path)]) == 2
    assert "finetune.yaml already exist" in capsys.readouterr().err
    assert (tmp_path / "recipes" / "finetune.yaml").read_text() == "# my edits\n"  # nothing lost
    assert main(["recipe", "copy", "finetun", str(tmp_path)]) == 2
    assert "no shipped recipe 'finetun' (did you mean 'finetune'?)" in capsys.readouterr().err
    assert main(["recipe", "list"]) == 0
    listed = capsys.readouterr().out
    assert "demo/study" in listed and "launch/multi-gpu" in listed and "study-modern" in listed


def subcommands(parser, path=("imret",)):
    """Every command and subcommand's parser, with its words."""
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from subcommands(child, (*path, name))


def test_every_command_says_what_it_does_and_gives_an_example_readme_knows():
    readme = (ROOT / "README.md").read_text()
    found = list(subcommands(build_parser()))
    assert len(found) >= 20
    for words, parser in found:
        command = " ".join(words)
        assert parser.description and len(parser.description) > 15, command
        examples = [line.strip() for line in (parser.epilog or "").splitlines()[1:]]
        assert examples and all(command in example for example in examples), command
        assert command in readme, f"README does not show {command}"


def imaterialist_set(root: Path, images: int = 60, seed: int = 4) -> Path:
    """An iMaterialist (Fashion) 2020 layout drawn from the synthetic scenes: train/<id>.jpg, label_descriptions.json
    (the 12 garment classes) and train.csv with one run-length encoded row per garment (the scene's apparel mask)."""
    (root / "train").mkdir(parents=True)
    (root / "label_descriptions.json").write_text(json.dumps({"categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}))
    rows = ["ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds"]
    for index in range(images):
        image, mask, garments = render_scene(seed, index, 48)
        image_id = f"{index:08x}{seed:04x}"
        Image.fromarray(image).save(root / "train" / f"{image_id}.jpg", quality=90)
        flat = np.concatenate([[0], (mask.T.ravel() > 0).astype(np.int8), [0]])  # column-major, as the format has it
        edges = np.flatnonzero(np.diff(flat))
        runs = " ".join(f"{start + 1} {end - start}" for start, end in zip(edges[::2], edges[1::2]))
        rows += [f"{image_id},{runs},48,48,{CLASSES.index(garment)}," for garment in garments]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_smoke_run_of_the_real_study_on_a_small_imaterialist_set(tmp_path, monkeypatch, caplog):
    """`imret study recipes/study.yaml --debug` from the recipes a user copied, on 60 images: every stage runs at debug
    sizes into study.out-debug/; the recipes that need ImageNet weights this machine lacks are reported and skipped,
    with the rows and the masking that depend on them."""
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))

    downloads = []

    def offline(*args, **kwargs):
        downloads.append(args)
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    imaterialist_set(tmp_path / "data" / "imaterialist")
    monkeypatch.chdir(tmp_path)
    assert main(["recipe", "copy", "all", "."]) == 0
    assert main(["study", "recipes/study.yaml", "--debug", "--train-set", "data.workers=0", "--train-set", "run.dir=runs-b",
                 "--set", "study.queries=20"]) == 0  # fmt: skip
    out = tmp_path / "studies" / "imaterialist-debug"
    results = json.loads((out / "retrieval.json").read_text())
    trained = {"classifier from scratch", "classifier from scratch, no augmentation", "from scratch on masked images"}
    assert set(results["models"]) == trained
    assert set(results["unavailable"]) == set(load_study_rows()) - trained  # weights this machine lacks, said why
    assert "ImageNet weights" in results["unavailable"]["fine-tuned classifier"]
    assert "skipped" in results["unavailable"]["triplet from classifier"]  # it starts from the skipped classifier
    assert (out / "report.md").is_file() and (out / "shards" / "manifest.json").is_file()
    assert not (tmp_path / "shards" / "imaterialist").exists()  # nothing real, even where --train-set moves the runs
    assert not (tmp_path / "runs").exists() and not (tmp_path / "runs-b").exists()
    config = (out / "runs" / "scratch" / "config.yaml").read_text()
    assert "image_size: 64" in config and "workers: 0" in config  # debug sizes, then --train-set
    assert "stage train: recipes/finetune.yaml skipped: it needs resnet18's ImageNet weights" in caplog.text
    assert "a smoke run never downloads" in results["unavailable"]["ImageNet-pretrained, not trained"]
    assert downloads == []  # not even tried


def load_study_rows():
    from imret.study import load_study

    return load_study(ROOT / "recipes" / "study.yaml").compare.models


def test_set_replaces_a_list_in_flow_style_and_train_set_reaches_every_recipe(tmp_path):
    study = load_recipe(ROOT / "recipes" / "study.yaml", ["train.overrides=[data.workers=2, optim.lr=1e-3]",
                                                          "embed.layer={}"], root=StudyRecipe)  # fmt: skip
    assert study.train.overrides == ["data.workers=2", "optim.lr=1e-3"] and study.embed.layer == {}
    from imret.study import training_recipe

    recipe = training_recipe(str(ROOT / "recipes" / "scratch.yaml"), study, ["data.workers=5"])
    assert recipe.data.workers == 5 and recipe.optim.lr == 1e-3  # --train-set after train.overrides
    with pytest.raises(Exception, match="train.overrides: expected a list"):
        load_recipe(ROOT / "recipes" / "study.yaml", ["train.overrides=data.workers=2"], root=StudyRecipe)


def test_a_run_moved_by_train_set_is_where_the_recipes_that_start_from_it_look(tmp_path, monkeypatch):
    """--train-set run.dir=runs-b trains every model anew; triplet-from-classifier, whose recipe starts from
    runs/finetune, must then start from runs-b/finetune, not from an older run at the recipe's own path."""
    from imret.study import load_study, moved_runs, resolve_run

    monkeypatch.chdir(ROOT)
    study = load_study(ROOT / "recipes" / "study.yaml")
    runs = moved_runs(study, ["run.dir=runs-b"])
    assert runs["runs/finetune"] == "runs-b/finetune" and runs["runs/segment"] == "runs-b/segment"
    assert resolve_run("runs/finetune", study, ["run.dir=runs-b"], runs) == "runs-b/finetune"  # a row naming the run
    assert moved_runs(study, [])["runs/finetune"] == "runs/finetune"
    # a recipe only the study's overrides make whole (model.init: run, its weights given there) is still followed
    (tmp_path / "needs.yaml").write_text("run:\n  name: needs\nmodel:\n  init: run\n")
    study.train.recipes, study.train.overrides = [str(tmp_path / "needs.yaml")], ["model.weights=runs/finetune"]
    assert moved_runs(study, ["run.dir=runs-b"]) == {"runs/needs": "runs-b/needs"}
