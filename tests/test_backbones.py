"""timm backbones and the metric losses in training: tiny timm models at random init (resnet10t, a two-block test
ViT), pretrained weights only from a local file or a Hugging Face cache the test writes, never a download."""

import json

import huggingface_hub.constants
import pytest
import torch

from conftest import tiny_recipe_overrides
from imret.config import load_recipe
from imret.errors import ImretError
from imret.train import train

PAIR_AND_PROXY_LOSSES = ["multi_similarity", "contrastive", "supcon", "ntxent", "circle", "proxy_anchor", "arcface",
                         "subcenter_arcface"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download weights (timm's hub and URL paths) fails the test at once."""
    import timm.models._builder
    import timm.models._hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse)


def recipe(tmp_path, shards, name, extra=()):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    return load_recipe(path, tiny_recipe_overrides(shards, tmp_path / "runs", name) + list(extra))


def meta_of(run):
    return json.loads((run / "model" / "meta.json").read_text())


def test_a_timm_cnn_and_vit_train_embed_search_and_start_another_run(tmp_path, train_shards):
    from imret.embed import embed, load_embeddings
    from imret.index import build_and_save
    from imret.search import search_files

    short = ["train.max_epochs=1", "train.steps_per_epoch=2", "data.batch_size_per_device=16"]
    cnn = train(recipe(tmp_path, train_shards, "cnn", ["model.backbone=timm:resnet10t", *short]))
    vit = train(recipe(tmp_path, train_shards, "vit", ["model.backbone=timm:test_vit", "task.name=triplet",
                                                       "loss.name=supcon", *short]))  # fmt: skip
    assert meta_of(cnn)["embedding"] == {"layer": "pooled", "dim": 512} and meta_of(cnn)["backbone"] == "timm:resnet10t"
    assert meta_of(vit)["embedding"] == {"layer": "head", "dim": 128}
    assert meta_of(vit)["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    out = embed(str(vit), train_shards, "val", out=tmp_path / "emb", workers=0, layer="pooled")
    vectors, _, _, meta = load_embeddings(out)
    assert vectors.shape[1] == 64 and meta["layer"] == "pooled"  # the ViT's own width, through embed.layer
    gallery = embed(str(vit), train_shards, "train", out=tmp_path / "gallery", workers=0)
    build_and_save(gallery, device="cpu")
    query = tmp_path / "query.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 30, 200)).save(query)
    (found,) = search_files(gallery, [str(query)], k=3)
    assert len(found["neighbours"]) == 3
    follow = train(recipe(tmp_path, train_shards, "follow", ["model.backbone=timm:resnet10t", "model.init=run",
                                                             f"model.weights={cnn}", *short]))  # fmt: skip
    assert meta_of(follow)["initialisation"].startswith(f"run {cnn}")


def test_every_pml_loss_trains_a_debug_epoch(tmp_path, train_shards):
    for name in PAIR_AND_PROXY_LOSSES:
        run = train(recipe(tmp_path, train_shards, name, ["task.name=triplet", f"loss.name={name}"]), debug=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if r["split"] == "val"]
        assert len(val) == 3 and all(r["loss"] == r["loss"] for r in val), name  # finite, from the untrained start on
        weights = torch.load(run / "model" / "weights.pt", weights_only=True)
        assert ("proxies.weight" in weights) == (name in ("proxy_anchor", "arcface", "subcenter_arcface")), name
    assert weights["proxies.weight"].shape == (12 * 3, 128)  # subcenter_arcface: 3 sub-centres for each of 12 tags


def write_cached_weights(cache, repo, state):
    """A Hugging Face cache entry as hf_hub_download leaves it: a snapshot, and refs/main naming it."""
    from safetensors.torch import save_file

    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "model.safetensors")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    return snapshot / "model.safetensors"


def test_pretrained_timm_weights_come_from_a_local_file_or_the_cache_and_nothing_else(tmp_path, train_shards, monkeypatch):
    import timm

    reference = timm.create_model("resnet10t", num_classes=0).state_dict()
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    short = ["model.backbone=timm:resnet10t", "train.max_epochs=1", "train.steps_per_epoch=1", "optim.lr=1e-12"]
    with pytest.raises(ImretError, match=r"weights of timm:resnet10t are not in the Hugging Face cache .*"
                                         r"timm.create_model\('resnet10t', pretrained=True\).*--set model.weights="):  # fmt: skip
        train(recipe(tmp_path, train_shards, "none", [*short, "model.init=pretrained"]))
    cached = write_cached_weights(cache, "timm/resnet10t.c3_in1k", {k: v.contiguous() for k, v in reference.items()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for init, weights in (("pretrained", []), ("imagenet", [f"model.weights={cached}"])):
        run = train(recipe(tmp_path, train_shards, init, [*short, f"model.init={init}", *weights]))
        assert meta_of(run)["initialisation"] == f"pretrained ({cached})"
        trained = torch.load(run / "model" / "weights.pt", weights_only=True)
        assert torch.allclose(trained["trunk.conv1.0.weight"], reference["conv1.0.weight"], atol=1e-6)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}, other)
    with pytest.raises(ImretError, match=r"other.safetensors does not fit timm:resnet10t: \d+ of its tensors are missing or of another shape"):
        train(recipe(tmp_path, train_shards, "wrong", [*short, "model.init=pretrained", f"model.weights={other}"]))


def test_an_unknown_timm_name_and_a_vit_under_a_unet_are_one_line_each(tmp_path, train_shards):
    with pytest.raises(ImretError, match=r"timm has no model 'resnet10tt' \(did you mean 'resnet10t'"):
        train(recipe(tmp_path, train_shards, "typo", ["model.backbone=timm:resnet10tt"]))
    with pytest.raises(ImretError, match=r"smp's U-Net cannot use timm:test_vit as its encoder"):
        train(recipe(tmp_path, train_shards, "unet", ["model.backbone=timm:test_vit", "task.name=segmentation"]))


def test_layer_decay_trunk_and_proxy_rates_are_groups_of_the_optimiser(tmp_path, train_shards):
    from timm.optim import param_groups_layer_decay

    from imret.optim import param_groups
    from imret.tasks import make_task

    plain = recipe(tmp_path, train_shards, "p", ["model.backbone=timm:resnet10t"])
    net = make_task(plain, [f"c{i}" for i in range(12)]).build_model()
    assert len(param_groups(net, plain, 0.1)) == 1  # as before: one group, checkpoints of earlier runs resume
    tuned = recipe(tmp_path, train_shards, "t", ["model.backbone=timm:resnet10t", "task.name=triplet",
                                                 "loss.name=proxy_anchor", "loss.proxy_lr_scale=100",
                                                 "optim.layer_decay=0.5", "optim.trunk_lr_scale=0.1"])  # fmt: skip
    net = make_task(tuned, [f"c{i}" for i in range(12)]).build_model()
    groups = param_groups(net, tuned, 0.1)
    assert groups[0]["lr"] == 0.1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in net.head.parameters()}
    assert groups[-1]["lr"] == pytest.approx(10.0) and groups[-1]["params"] == [net.proxies.weight]
    expected = sorted(0.1 * 0.1 * g["lr_scale"] for g in param_groups_layer_decay(net.trunk, layer_decay=0.5))
    assert sorted(g["lr"] for g in groups[1:-1]) == pytest.approx(expected) and len(set(expected)) > 3
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(list(net.parameters()))  # every parameter in exactly one group


@pytest.mark.parametrize("task, trunk_prefix, head_key", [("multilabel", "trunk.", "head.weight"),
                                                       ("segmentation", "unet.encoder.", "unet.segmentation_head.0.weight")])  # fmt: skip
def test_a_frozen_trunk_keeps_its_weights_and_statistics_while_the_head_trains(tmp_path, train_shards, task, trunk_prefix,
                                                                             head_key):  # fmt: skip
    model = ["model.backbone=timm:resnet10t", f"task.name={task}"]
    run = train(recipe(tmp_path, train_shards, "frozen", model + ["train.freeze_trunk_epochs=1", "train.max_epochs=2",
                                                                  "train.steps_per_epoch=2", "checkpoint.keep=3"]))  # fmt: skip
    first, second = sorted((run / "checkpoints").glob("step-*"))
    start = train_start(tmp_path, train_shards, model)
    after_one = torch.load(first / "state.pt", weights_only=True)["model"]
    after_two = torch.load(second / "state.pt", weights_only=True)["model"]
    trunk = [k for k in start if k.startswith(trunk_prefix)]
    assert trunk and all(torch.equal(start[k], after_one[k]) for k in trunk)  # weights and BatchNorm statistics alike
    assert not torch.equal(start[head_key], after_one[head_key])
    assert not all(torch.equal(after_one[k], after_two[k]) for k in trunk)


def train_start(tmp_path, shards, model):
    """The weights a run of that recipe starts from (seed + rank 0)."""
    from accelerate.utils import set_seed

    from imret.tasks import make_task

    set_seed(0)
    start = recipe(tmp_path, shards, "start", model)
    return make_task(start, [f"c{i}" for i in range(12)]).build_model().state_dict()


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])  # ConvNeXt's feature pyramid renames its stages
def test_a_timm_unet_encoder_starts_from_published_weights_and_from_a_classifier_run(tmp_path, name):
    import re

    import timm

    from imret.models import SegmentationNet, initialise_encoder

    full = timm.create_model(name, num_classes=0)
    torch.save(full.state_dict(), tmp_path / "published.pth")
    run = tmp_path / "classifier" / "model"
    run.mkdir(parents=True)
    (run / "meta.json").write_text(json.dumps({"backbone": f"timm:{name}", "task": "multilabel", "epoch": 3}))
    torch.save({f"trunk.{k}": v for k, v in full.state_dict().items()}, run / "weights.pt")
    for init, weights in (("pretrained", tmp_path / "published.pth"), ("run", run.parent)):
        unet = SegmentationNet(f"timm:{name}").unet
        initialise_encoder(unet, f"timm:{name}", init, str(weights))
        encoder = unet.encoder.model.state_dict()
        held = {re.sub(r"^([^.]+)_(\d+)\.", r"\1.\2.", k): v for k, v in encoder.items()}  # the full model's names
        assert all(torch.equal(value, full.state_dict()[key]) for key, value in held.items()), init


@pytest.mark.parametrize("backbone, task, checkpointed", [("timm:test_vit", "multilabel", lambda net: net.trunk),
                                                          ("timm:resnet10t", "segmentation", lambda net: net.unet.encoder.model)])  # fmt: skip
def test_gradient_checkpointing_is_on_and_gives_the_same_gradients(tmp_path, train_shards, backbone, task, checkpointed):
    from imret.tasks import make_task

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        r = recipe(tmp_path, train_shards, "gc", [f"model.backbone={backbone}", f"task.name={task}",
                                                  f"model.grad_checkpointing={checkpointing}"])  # fmt: skip
        net = make_task(r, [f"c{i}" for i in range(12)]).build_model()
        assert checkpointed(net).grad_checkpointing == checkpointing
        net(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
