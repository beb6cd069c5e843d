import csv

import numpy as np
import pytest

from imret.data.synth import CLASSES, EXCLUSIVE, render_scene, write_synth
from imret.errors import DataError


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = render_scene(7, 3, 48), render_scene(7, 3, 48)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    assert not np.array_equal(render_scene(8, 3, 48)[0], a[0])
    assert not np.array_equal(render_scene(7, 4, 48)[0], a[0])


def test_garment_sets_are_wearable_and_masks_cover_them():
    counts = []
    for index in range(150):
        image, mask, garments = render_scene(0, index, 48)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        assert 1 <= len(garments) <= 5 and set(garments) <= set(CLASSES)
        assert all(len(group & set(garments)) <= 1 for group in EXCLUSIVE)
        counts += garments
    assert set(counts) == set(CLASSES)  # every class occurs


def test_folder_layout(tmp_path):
    out = write_synth(tmp_path / "d", images=12, size=40, seed=1)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 12 and (out / "classes.txt").read_text().split() == CLASSES
    for row in rows:
        assert (out / "images" / row["image"]).is_file()
        assert (out / "masks" / row["image"].replace(".jpg", ".png")).is_file()
        assert set(row["labels"].split(";")) <= set(CLASSES)
    with pytest.raises(DataError, match="not empty: choose another OUT or pass --overwrite"):
        write_synth(out, images=2, size=40)
    write_synth(out, images=2, size=40, overwrite=True)
    assert len(list((out / "images").iterdir())) == 2
