from pathlib import Path

import pytest

from imret.cli import main
from imret.config import Recipe, check_against_shards, load_recipe, recipe_to_yaml, recipe_from_dict, parse_yaml
from imret.errors import RecipeError

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_study_settings(tmp_path):
    recipe = load_recipe(write(tmp_path, ""))
    assert (recipe.data.image_size, recipe.data.batch_size_per_device, recipe.optim.lr) == (224, 128, 3.0e-4)
    assert recipe.optim.plateau_factor == 0.1


def test_values_are_read_and_typed(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1.0e-3\n  weight_decay: 0\ndata:\n  load_size: 256\n"))
    assert recipe.optim.lr == 1.0e-3 and isinstance(recipe.optim.weight_decay, float)
    assert recipe.load_size == 256 and recipe.data.image_size == 224


def test_unknown_key_suggests_the_close_one(tmp_path):
    message = error_of(tmp_path, "optim:\n  lrr: 0.1\n")
    assert "unknown key 'optim.lrr'" in message and "did you mean 'lr'" in message


def test_unknown_section_suggests_the_close_one(tmp_path):
    assert "did you mean 'augment'" in error_of(tmp_path, "augmnet:\n  hflip: true\n")


def test_duplicate_key_names_both_lines(tmp_path):
    message = error_of(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n")
    assert "duplicate key 'lr' on line 3 (first on line 2)" in message


def test_exponent_without_dot_is_a_string_and_rejected(tmp_path):
    message = error_of(tmp_path, "optim:\n  lr: 3e-4\n")
    assert "optim.lr: expected a number, got the string '3e-4'" in message and "write 3.0e-4" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  batch_size_per_device: 12.5\n", "data.batch_size_per_device: expected an integer"),
        ("augment:\n  hflip: 'yes'\n", "augment.hflip: expected true or false"),
        ("data:\n  workers: true\n", "data.workers: expected an integer"),
        ("run:\n  name: 7\n", "run.name: expected a string"),
        ("optim: 3\n", "section 'optim' must be a mapping"),
        ("- a\n- b\n", "a recipe is a mapping"),
    ],
)
def test_wrong_types(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_choice_with_typo_suggests(tmp_path):
    message = error_of(tmp_path, "task:\n  name: segmentaton\n")
    assert "'segmentaton' is not one of" in message and "did you mean 'segmentation'" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim:\n  lr: 0.0\n", "optim.lr: must be > 0.0, got 0.0"),
        ("data:\n  batch_size_per_device: 0\n", "data.batch_size_per_device: must be >= 1, got 0"),
        ("checkpoint:\n  keep: 1\n", "checkpoint.keep: must be >= 2, got 1"),
        ("data:\n  max_bad_fraction: 1.0\n", "data.max_bad_fraction: must be < 1.0, got 1.0"),
        ("optim:\n  lr: .nan\n", "optim.lr: must be a finite number, got nan"),
        ("optim:\n  weight_decay: .inf\n", "optim.weight_decay: must be a finite number, got inf"),
    ],
)
def test_out_of_range(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  load_size: 200\n", "data.load_size (200) is smaller than data.image_size (224)"),
        ("augment:\n  crop: random\n", "random crops nothing"),
        ("task:\n  positive_min_iou: 0.2\n  negative_max_iou: 0.3\n", "must be below task.positive_min_iou"),
        ("task:\n  margin_start: 2.0\n  margin_end: 1.0\n", "task.margin_end (1.0) is below task.margin_start"),
        ("model:\n  init: run\n", "model.init: run needs model.weights"),
        ("model:\n  init: scratch\n  weights: runs/x\n", "model.weights (runs/x) is only read with model.init pretrained, imagenet or run"),
        ("loss:\n  name: supcon\n", "loss.name: supcon trains a metric-learning embedding: set task.name: triplet"),
        ("task:\n  name: triplet\nloss:\n  name: multi_similarity\n  temperature: 0.1\n",
         "loss.temperature is not read by loss.name multi_similarity (miner none): it reads loss.alpha, loss.base, loss.beta"),
        ("task:\n  name: triplet\nloss:\n  miner: pair_margin\n", "loss.miner: pair_margin selects pairs for the pair losses"),
        ("task:\n  name: triplet\nloss:\n  name: contrastive\n  miner_epsilon: 0.2\n", "loss.miner_epsilon is not read"),
        ("task:\n  name: triplet\nloss:\n  name: supcon\n  proxy_lr_scale: 10.0\n", "loss.proxy_lr_scale is not read"),
        ("optim:\n  layer_decay: 0.7\n", "optim.layer_decay: needs a timm backbone (model.backbone: timm:<name>)"),
        ("model:\n  grad_checkpointing: true\n", "model.grad_checkpointing: needs a timm backbone"),
        ("task:\n  name: segmentation\nmodel:\n  backbone: timm:resnet10t\noptim:\n  layer_decay: 0.7\n",
         "optim.layer_decay: the U-Net's timm encoder (a features_only model) has no layer groups"),
        ("train:\n  max_epochs: 2\n  freeze_trunk_epochs: 2\n", "train.freeze_trunk_epochs (2) must be below train.max_epochs"),
    ],
)
def test_conflicts(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_the_loss_section_is_typed_strict_and_fills_each_losss_defaults(tmp_path):
    root = Path(__file__).parents[1]
    recipe = load_recipe(root / "recipes" / "triplet.yaml", ["loss.name=multi_similarity", "loss.miner=multi_similarity"])
    assert (recipe.loss.value("alpha"), recipe.loss.value("beta"), recipe.loss.value("miner_epsilon")) == (2.0, 50.0, 0.1)
    assert load_recipe(root / "recipes" / "triplet.yaml", ["loss.name=subcenter_arcface"]).loss.value("sub_centers") == 3
    assert "did you mean 'temperature'" in error_of(tmp_path, "loss:\n  temprature: 0.1\n")
    assert "'supkon' is not one of" in error_of(tmp_path, "loss:\n  name: supkon\n")


def test_conflicts_with_the_shards():
    segment = recipe_from_dict({"task": {"name": "segmentation"}})
    with pytest.raises(RecipeError, match="segmentation needs masks, and the shards in s/ have none"):
        check_against_shards(segment, has_masks=False, shards="s/")
    masked = recipe_from_dict({"data": {"zero_background": True}})
    with pytest.raises(RecipeError, match="zero_background needs masks"):
        check_against_shards(masked, has_masks=False, shards="s/")
    check_against_shards(segment, has_masks=True, shards="s/")


def test_overrides_convert_text_by_type(tmp_path):
    recipe = load_recipe(write(tmp_path, ""), ["optim.lr=3e-4", "augment.hflip=true", "data.load_size=null",
                                               "run.name=x", "data.workers=2"])
    assert recipe.optim.lr == 3e-4 and recipe.augment.hflip is True and recipe.data.load_size is None
    assert (recipe.run.name, recipe.data.workers) == ("x", 2)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr", "expected section.key=value"),
        ("lr=0.1", "expected section.key=value"),
        ("optim.lrr=0.1", "did you mean 'lr'"),
        ("data.workers=two", "data.workers: expected an integer, got 'two'"),
        ("augment.hflip=maybe", "augment.hflip: expected true or false"),
        ("optim.lr=-1", "optim.lr: must be > 0.0"),
        ("data.load_size=100", "data.load_size (100) is smaller"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    assert expected in error_of(tmp_path, "", [override])


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "optim: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1.0e-3\n"), ["task.name=triplet"])
    again = recipe_from_dict(parse_yaml(recipe_to_yaml(recipe)))
    assert again == recipe and isinstance(again, Recipe)


def test_recipe_show_prints_and_fails_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n")
    assert main(["recipe", "show", str(path), "--set", "run.name=abc"]) == 0
    assert "name: abc" in capsys.readouterr().out
    assert main(["recipe", "show", str(path), "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'lr'" in err[0]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_recipe_loads(path):
    from imret.study import load_study

    load_study(path) if path.name.startswith("study") else load_recipe(path)


def test_recipes_are_shipped():
    assert len(RECIPES) >= 10


def test_the_study_recipe_has_every_row_of_the_report_and_its_controls():
    from imret.study import load_study

    root = Path(__file__).parents[1]
    study = load_study(root / "recipes" / "study.yaml")
    rows = study.compare.models
    report_rows = {"fine-tuned classifier": "finetune.yaml", "classifier from scratch": "scratch-aug.yaml",
                   "ImageNet-pretrained, not trained": "imagenet-resnet18", "triplet": "triplet.yaml",
                   "rotation self-supervised": "rotation.yaml"}  # fmt: skip
    controls = {"classifier from scratch, no augmentation": "scratch.yaml",
                "triplet, pooled 512-d (the study's layer)": "triplet.yaml",
                "from scratch on masked images": "scratch-masked.yaml", "fine-tuned on masked images": "finetune-masked.yaml"}  # fmt: skip
    for name, entry in {**report_rows, **controls}.items():
        assert rows[name].endswith(entry), name
    assert study.embed.layer == {"triplet, pooled 512-d (the study's layer)": "pooled"}
    trained = {Path(r).name for r in study.train.recipes}
    assert {Path(e).name for e in rows.values() if e.endswith(".yaml")} <= trained and "segment.yaml" in trained
    for recipe in study.train.recipes:
        load_recipe(root / recipe)
    assert study.data.test_fraction > 0 and study.compare.segmentation == "recipes/segment.yaml"
