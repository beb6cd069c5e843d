import numpy as np
import pytest
import torch

from imret.config import AugmentConfig
from imret.data.augment import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment, denormalise, quarter_turns


def blocky_batch(n=6, size=64, seed=0):
    """Masks of large random blocks, and images whose pixels are white exactly where the mask is set."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 2, (n, 1, 8, 8), generator=gen).to(torch.uint8)
    masks = coarse.repeat_interleave(size // 8, 2).repeat_interleave(size // 8, 3)
    return (masks * 255).repeat(1, 3, 1, 1), masks


@pytest.mark.parametrize("crop", ["random", "random_resized"])
def test_image_and_mask_stay_aligned(crop):
    images, masks = blocky_batch()
    aug = DeviceAugment(AugmentConfig(crop=crop, hflip=True, crop_scale_min=0.3), 48, 64, training=True)
    torch.manual_seed(1)
    x, m = aug(images, masks)
    assert x.shape == (6, 3, 48, 48) and m.shape == (6, 1, 48, 48)
    assert set(m.unique().tolist()) <= {0.0, 1.0}  # nearest-neighbour for masks
    bright = denormalise(x).mean(1, keepdim=True) > 0.5
    assert (bright == m.bool()).float().mean() > 0.97  # only resampled edges may differ


def test_augmentation_is_random_per_sample():
    images, masks = blocky_batch(n=1)
    aug = DeviceAugment(AugmentConfig(crop="random_resized", hflip=True), 48, 64, training=True)
    x, _ = aug(images.repeat(8, 1, 1, 1), masks.repeat(8, 1, 1, 1))
    assert len({tuple(v.flatten()[:200].tolist()) for v in x}) > 1


def test_colour_jitter_changes_the_image_only():
    images, masks = blocky_batch()
    images = (images // 2 + 40).to(torch.uint8)
    aug = DeviceAugment(AugmentConfig(color_jitter=1.0), 64, 64, training=True)
    x, m = aug(images, masks)
    assert torch.equal(m, masks.float())
    plain, _ = DeviceAugment(AugmentConfig(), 64, 64, training=True)(images, masks)
    assert not torch.allclose(x, plain)


def test_eval_is_a_deterministic_centre_crop_and_normalises():
    images = torch.full((2, 3, 40, 40), 128, dtype=torch.uint8)
    images[:, :, 10:30, 10:30] = 255
    aug = DeviceAugment(AugmentConfig(crop="random_resized", hflip=True), 20, 40, training=False)
    x, m = aug(images)
    assert m is None and x.shape == (2, 3, 20, 20)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-5)


def test_zero_background_zeroes_outside_the_mask():
    images, masks = blocky_batch()
    images = torch.full_like(images, 200)
    x, m = DeviceAugment(AugmentConfig(), 64, 64, training=False, zero_background=True)(images, masks)
    pixels = denormalise(x)
    assert torch.allclose(pixels * (1 - m), torch.zeros_like(pixels), atol=1e-5)
    assert torch.allclose(pixels[m.expand_as(pixels).bool()], torch.tensor(200 / 255), atol=1e-5)


def test_quarter_turns_are_four_distinct_exact_rotations():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).view(1, 3, 5, 5)
    turned = quarter_turns(image.repeat(4, 1, 1, 1), torch.arange(4))
    for k in range(4):
        assert np.array_equal(turned[k].numpy(), np.rot90(image[0].numpy(), k, axes=(1, 2)))
    assert len({tuple(t.flatten().tolist()) for t in turned}) == 4
    back = quarter_turns(turned, (4 - torch.arange(4)) % 4)
    assert torch.equal(back, image.repeat(4, 1, 1, 1))


@pytest.mark.parametrize("crop", ["random", "random_resized", "none"])
def test_augmentation_compiles_as_one_graph_so_it_never_reads_back(crop):
    """fullgraph=True refuses anything that reads a device value on the host (kornia's per-sample crops do)."""
    images, masks = blocky_batch()
    aug = DeviceAugment(AugmentConfig(crop=crop, hflip=True, color_jitter=1.0), 48, 64, training=True)
    x, m = torch.compile(aug, fullgraph=True, backend="eager")(images, masks)
    assert x.shape == (6, 3, 48, 48) and m.shape == (6, 1, 48, 48)
    turns = torch.compile(quarter_turns, fullgraph=True, backend="eager")(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    assert turns.shape == x.shape


def test_random_crop_and_flip_copy_pixels_exactly():
    """A random crop from load_size to image_size samples pixel centres: every output pixel is an input pixel
    (its position written into the red and green channels), rows and columns in one window, mirrored when
    flipped, and the mask is read at exactly the same positions."""
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    images = torch.stack([4 * rows, 4 * cols, torch.zeros_like(rows)]).to(torch.uint8).repeat(8, 1, 1, 1)
    masks = ((rows + 2 * cols) % 3 == 0).to(torch.uint8)[None, None].repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    x, m = DeviceAugment(AugmentConfig(crop="random", hflip=True), 48, 64, training=True)(images, masks)
    position = torch.round(denormalise(x) * 255 / 4).long()
    flips = set()
    for i in range(8):
        source_rows, source_cols = position[i, 0], position[i, 1]
        top, left = int(source_rows.min()), int(source_cols.min())
        assert torch.equal(source_rows, (top + torch.arange(48))[:, None].expand(48, 48))
        flipped = bool(source_cols[0, 0] > source_cols[0, -1])
        window = left + torch.arange(48)
        assert torch.equal(source_cols, (window.flip(0) if flipped else window)[None].expand(48, 48))
        assert torch.equal(m[i, 0], masks[i, 0][source_rows, source_cols].float())
        flips.add(flipped)
    assert flips == {False, True}


def test_a_flip_without_a_crop_frames_the_image_as_evaluation_does():
    """crop: none with hflip trains on the centre window evaluation uses, mirrored or not; never the whole
    load-size image squeezed to the training size."""
    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    torch.manual_seed(0)
    trained, _ = DeviceAugment(AugmentConfig(crop="none", hflip=True), 32, 40, training=True)(images)
    evaluated, _ = DeviceAugment(AugmentConfig(crop="none", hflip=True), 32, 40, training=False)(images)
    flips = set()
    for i in range(16):
        flipped = not torch.allclose(trained[i], evaluated[i], atol=1e-5)
        assert torch.allclose(trained[i], evaluated[i].flip(-1) if flipped else evaluated[i], atol=1e-5)
        flips.add(flipped)
    assert flips == {False, True}
