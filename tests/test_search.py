"""imret search, imret serve and the key -> shard lookup, on a tiny study's real models and indexes: the server
runs in a subprocess and is queried over HTTP, the page in a real headless Chromium; neighbours are checked
against brute-force numpy over the embedding job's own vectors, and shard bytes against tarfile."""

import http.client
import json
import os
import shutil
import struct
import tarfile
import threading
import zlib
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from imret.bench_serve import form_data, request, running_server
from imret.cli import main
from imret.data.lookup import Lookup, lookup_complete, lookup_paths
from imret.index import ensure_lookups
from imret.keyfile import KeyFile
from imret.metrics import label_iou
from imret.search import Gallery
from imret.serve import Batcher
from imret.study import load_study, run_study
from test_study import write_study

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
VARIANTS = [("classifier", "original"), ("rotation", "masked")]


def refuse(*args, **kwargs):
    raise URLError("offline")


@pytest.fixture(scope="module")
def study(tmp_path_factory, train_shards) -> Path:
    """A tiny study's output, offline: a classifier and a rotation model, each indexed whole and masked by a U-Net."""
    tmp = tmp_path_factory.mktemp("search-study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp / "empty-hub"))
        patch.setattr(torch.hub, "load_state_dict_from_url", refuse)
        run_study(load_study(write_study(tmp, train_shards)))
    return tmp / "out"


def index_dir(study: Path, model: str, variant: str) -> Path:
    return study / "embeddings" / model / f"{variant}-train"


def tar_members(shards: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a split, read with tarfile alone."""
    manifest = json.loads((shards / "manifest.json").read_text())
    members: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return members


@pytest.fixture(scope="module")
def train_members(train_shards):
    return tar_members(train_shards, "train")


@pytest.fixture(scope="module")
def val_members(train_shards):
    return tar_members(train_shards, "val")


def keys_of(directory: Path) -> list[str]:
    return list(KeyFile(directory / "keys"))


def brute_force(directory: Path, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    gallery = np.load(directory / "embeddings.npy")
    distances = ((gallery - query) ** 2).sum(1)
    nearest = np.argsort(distances, kind="stable")[:k]
    return [keys_of(directory)[i] for i in nearest], distances[nearest]


def sidecar_of(directory: Path) -> dict:
    return json.loads((directory / "index.faiss.json").read_text())


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the lookup


def test_the_lookup_finds_every_key_and_reads_what_tarfile_reads(study, train_members, val_members):
    directory = index_dir(study, "classifier", "original")
    sidecar = sidecar_of(directory)
    ensure_lookups(directory, sidecar)  # the study scores without lookups; search and serve build them once
    lookup = Lookup(directory, "train", sidecar["locations"]["shards"])
    keys, labels = keys_of(directory), np.load(directory / "labels.npy")
    assert isinstance(lookup.rows, np.memmap) and len(lookup) == len(keys) == len(train_members)
    for row, key in enumerate(keys):
        assert lookup.find(key) == row and lookup.key(row) == key
    for row in (0, 17, len(keys) - 1):
        assert lookup.image(row) == (train_members[keys[row]]["jpg"], "image/jpeg")
        assert lookup.labels(row) == list(np.flatnonzero(labels[row]))
    for unknown in ("", "nope", keys[0][:-1], keys[0] + "x", "../" + keys[0], "k" * 500):
        assert lookup.find(unknown) is None
    val = Lookup(directory, "val", sidecar["locations"]["shards"])
    assert [val.key(r) for r in range(len(val))] == list(val_members)  # every sample, in tar order



def test_finding_a_key_reads_a_few_records_not_a_copy_of_the_hash_column(tmp_path):
    """A lookup written directly at 200,000 keys: each find holds far less than the 1.6 MB hash column, which a
    copy of it would allocate."""
    import tracemalloc

    from imret.data.lookup import HASHED, ROW, key_hash

    count = 200_000
    keys = [f"k{i:07d}".encode() for i in range(count)]
    hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
    rows = np.zeros(count, ROW)
    rows["key"] = keys
    order = np.argsort(hashes, kind="stable")
    hashed = np.empty(count, HASHED)
    hashed["hash"], hashed["row"] = hashes[order], order
    rows_path, hash_path, done_path = lookup_paths(tmp_path, "train")
    rows_path.parent.mkdir()
    np.save(rows_path, rows)
    np.save(hash_path, hashed)
    done_path.write_text(json.dumps({"shards": []}))
    lookup = Lookup(tmp_path, "train", str(tmp_path))
    wanted = [0, 1, 99_999, 199_999]
    tracemalloc.start()
    found = [lookup.find(keys[row].decode()) for row in wanted] + [lookup.find("k9999999")]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found == wanted + [None] and peak < count * 8 // 10

def test_a_damaged_or_unfinished_lookup_is_built_again(study, tmp_path):
    copy = shutil.copytree(index_dir(study, "classifier", "original"), tmp_path / "index")
    sidecar = sidecar_of(copy)
    rows_path, _, done_path = lookup_paths(copy, "train")
    hash_now = sidecar["shards_manifest_hash"]
    assert lookup_complete(copy, "train", hash_now, sidecar["count"])
    assert not lookup_complete(copy, "train", hash_now, sidecar["count"] + 1)  # made for another gallery
    rows_path.write_bytes(rows_path.read_bytes()[:-10])  # truncated
    assert not lookup_complete(copy, "train", hash_now, sidecar["count"])
    Gallery(copy, masked=False)
    assert lookup_complete(copy, "train", hash_now, sidecar["count"])
    done_path.unlink()  # as if killed before its last file
    assert not lookup_complete(copy, "train", hash_now, sidecar["count"])
    lookup = Gallery(copy, masked=False).lookup
    assert lookup.find(keys_of(copy)[5]) == 5


# ---------------------------------------------------------------- imret search


@pytest.mark.parametrize("model,variant", VARIANTS)
def test_a_gallery_image_comes_back_first_and_neighbours_equal_brute_force(study, train_members, val_members, tmp_path,
                                                                           capsys, model, variant):  # fmt: skip
    directory = index_dir(study, model, variant)
    keys = keys_of(directory)
    gallery_file = tmp_path / "gallery.jpg"
    gallery_file.write_bytes(train_members[keys[7]]["jpg"])
    val_dir = directory.with_name(f"{variant}-val")
    val_key = keys_of(val_dir)[3]
    val_file = tmp_path / "val.jpg"
    val_file.write_bytes(val_members[val_key]["jpg"])
    masked = ["--masked"] if variant == "masked" else []
    code, out, err = run_cli(capsys, "search", str(directory), str(gallery_file), str(val_file), "--k", "6",
                             "--tags", "shirt;hat", "--json", *masked)  # fmt: skip
    assert code == 0, err
    gallery_result, val_result = json.loads(out)
    first = gallery_result["neighbours"][0]
    assert first["key"] == keys[7] and first["distance"] < 1e-6 * max(1.0, gallery_result["neighbours"][1]["distance"])
    # the embedding job's own vectors: the query embedded by search equals them, so the neighbours are theirs
    stored = np.load(directory / "embeddings.npy")[7]
    for result, query in ((gallery_result, stored), (val_result, np.load(val_dir / "embeddings.npy")[3])):
        expected_keys, expected_distances = brute_force(directory, query, 6)
        found = result["neighbours"]
        assert [n["key"] for n in found] == expected_keys
        assert [n["distance"] for n in found] == pytest.approx(expected_distances, rel=1e-3, abs=1e-4)
    # tags and label IoU against the gallery's labels
    classes = json.loads((directory / "meta.json").read_text())["classes"]
    labels = np.load(directory / "labels.npy")
    query_tags = np.isin(classes, ["shirt", "hat"])
    for n in val_result["neighbours"]:
        row = keys.index(n["key"])
        assert n["tags"] == [classes[i] for i in np.flatnonzero(labels[row])]
        assert n["label_iou"] == pytest.approx(float(label_iou(query_tags, labels[row])))
    assert (gallery_result["index"], gallery_result["variant"]) == (str(directory), variant)
    code, text, _ = run_cli(capsys, "search", str(directory), str(gallery_file), *masked)
    assert code == 0 and text.splitlines()[0] == f"{gallery_file}  (index: {directory}, {gallery_result['model']}, {variant})"
    assert keys[7] in text.splitlines()[1]


def test_a_study_folder_answers_from_its_best_model_or_the_one_named_as_serve_takes_it(study, train_members, tmp_path,
                                                                                      capsys):  # fmt: skip
    """`imret search STUDY_DIR`: the row with the highest mean label IoU in retrieval.json, its whole-image index;
    `--model NAME --masked` another row's masked index; the answer names the index, and is what that index gives."""
    results = json.loads((study / "retrieval.json").read_text())["results"]
    best = max(["classifier", "rotation"], key=lambda name: results[name]["original"]["mean"])
    other = "rotation" if best == "classifier" else "classifier"
    image = tmp_path / "query.jpg"
    image.write_bytes(train_members[keys_of(index_dir(study, other, "masked"))[5]]["jpg"])
    for extra, model, variant in [((), best, "original"), (("--model", other, "--masked"), other, "masked")]:
        code, out, err = run_cli(capsys, "search", str(study), str(image), "--json", *extra)
        assert code == 0, err
        (answer,) = json.loads(out)
        assert (answer["index"], answer["model"], answer["variant"]) == (str(index_dir(study, model, variant)), model,
                                                                         variant)  # fmt: skip
        code, out, _ = run_cli(capsys, "search", answer["index"], str(image), "--json", *(["--masked"] * (variant == "masked")))
        assert json.loads(out)[0]["neighbours"] == answer["neighbours"]
    code, _, err = run_cli(capsys, "search", str(study), str(image), "--model", "rotaton")
    assert code == 2 and "no model 'rotaton' (did you mean 'rotation'?)" in err


def test_search_and_serve_refuse_mismatches_and_bad_images_in_one_line(study, tmp_path, capsys):
    original, masked = index_dir(study, "classifier", "original"), index_dir(study, "classifier", "masked")
    image = tmp_path / "q.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    not_image, truncated = tmp_path / "notes.jpg", tmp_path / "cut.jpg"
    not_image.write_text("not an image")
    truncated.write_bytes(image.read_bytes()[:-200])
    other_weights = shutil.copytree(original, tmp_path / "other-weights")
    other_layer = shutil.copytree(original, tmp_path / "other-layer")
    other_shards = shutil.copytree(original, tmp_path / "other-shards")
    for copy, edit in ((other_weights, {"job": {**sidecar_of(original)["job"], "weights_sha256": "0" * 64}}),
                       (other_layer, {"layer": "head"}), (other_shards, {"shards_manifest_hash": "0" * 16})):  # fmt: skip
        (copy / "index.faiss.json").write_text(json.dumps({**sidecar_of(original), **edit}))
    cases = [
        ([str(original), str(image), "--masked"], "this index holds whole images"),
        ([str(masked), str(image)], "this index holds images masked by"),
        ([str(original), str(image), "--tags", "shirt;hatt"], "unknown tag 'hatt' (did you mean 'hat'?)"),
        ([str(original), str(not_image)], "notes.jpg: not an image"),
        ([str(original), str(truncated)], "cut.jpg: not a readable image (OSError: "),
        ([str(original), str(tmp_path / "missing.jpg")], "missing.jpg: No such file or directory"),
        ([str(original), str(image), "--k", "0"], "k=0: choose 1 to 100"),
        ([str(other_weights), str(image)], "is not the one this index was built with"),
        ([str(other_layer), str(image)], "built from the head layer"),
        ([str(other_shards), str(image)], "changed since they were embedded"),
        ([str(tmp_path), str(image)], "neither an index directory (index.faiss, imret index build) nor a study's"),
    ]  # fmt: skip
    for args, message in [(["search", *args], message) for args, message in cases] + [
        (["serve", str(tmp_path)], "neither an index directory (index.faiss, imret index build) nor a study's"),
        (["serve", str(original), str(other_weights)], "are both the original index of"),
    ]:  # fmt: skip
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == "", args
        assert len(err.strip().splitlines()) == 1 and err.startswith("imret: error: ") and message in err, err


def test_a_gallery_decodes_queries_by_the_path_its_embedding_job_used(study, tmp_path):
    """The wiring, not only decode_query: a gallery embedded with data.decode gpu hands its queries to the device
    path's decoder and resize, one embedded by the loader workers to PIL's (a photo larger than the load size,
    where the two differ)."""
    import io

    from imret.data.synth import render_scene
    from imret.search import decode_query

    copied = shutil.copytree(index_dir(study, "classifier", "original"), tmp_path / "index")
    buffer = io.BytesIO()
    Image.fromarray(render_scene(0, 5, 96)[0]).save(buffer, format="JPEG", quality=90)
    photo = buffer.getvalue()
    on_cpu = Gallery(copied, masked=False)
    size = on_cpu.meta["load_size"]
    assert on_cpu.sidecar["job"]["decode"] == "cpu" and torch.equal(on_cpu.decode(photo), decode_query(photo, size, "cpu"))
    sidecar = sidecar_of(copied)
    (copied / "index.faiss.json").write_text(json.dumps({**sidecar, "job": {**sidecar["job"], "decode": "gpu"}}))
    on_device = Gallery(copied, masked=False)
    assert torch.equal(on_device.decode(photo), decode_query(photo, size, "gpu"))
    assert not torch.equal(on_device.decode(photo), on_cpu.decode(photo))


def test_queries_waiting_together_are_embedded_in_one_pass_and_answered_alike(study, train_members):
    gallery = Gallery(index_dir(study, "rotation", "masked"), masked=True)
    keys = keys_of(gallery.dir)
    images = [gallery.decode(train_members[keys[i]]["jpg"]) for i in range(8)]
    batcher = Batcher(max_batch=32)
    futures = [batcher.submit(gallery, image, 3, None) for image in images]
    answers = [future.result(timeout=60) for future in futures]
    assert [a[0].key for a in answers] == keys[:8]
    assert sum(n * c for n, c in batcher.batch_sizes.items()) == 8 and max(batcher.batch_sizes) > 1
    for image, answer in zip(images, answers):
        alone = gallery.neighbours(gallery.embed([image]), 3, [None])[0]
        assert [n.key for n in answer] == [n.key for n in alone]
        assert [n.distance for n in answer] == pytest.approx([n.distance for n in alone], rel=1e-3, abs=1e-4)


# ---------------------------------------------------------------- imret serve over HTTP


@pytest.fixture(scope="module")
def server(study, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server([str(study), "--max-upload-mb", "1"], log) as url:
        yield url


def post_search(url: str, image: bytes, **fields) -> tuple[int, dict]:
    body, content_type = form_data(image, **fields)
    status, _, answer = request(url, "POST", "/search", body, {"Content-Type": content_type})
    return status, json.loads(answer) if answer.startswith(b"{") else {"raw": answer.decode(errors="replace")}


def test_the_api_answers_what_imret_search_answers(server, study, train_members, val_members, tmp_path, capsys):
    status, _, body = request(server, "GET", "/indexes")
    models = {m["name"]: m for m in json.loads(body)["models"]}
    assert status == 200 and set(models) == {"classifier", "rotation"}
    assert all(m["variants"] == ["original", "masked"] and m["gallery"] == len(train_members) for m in models.values())
    for model, variant in [("classifier", "original"), ("classifier", "masked"), ("rotation", "masked")]:
        directory = index_dir(study, model, variant)
        key = keys_of(directory)[11]
        image = tmp_path / "q.jpg"
        image.write_bytes(train_members[key]["jpg"])
        masked = variant == "masked"
        status, answer = post_search(server, image.read_bytes(), k=4, masked=str(masked).lower(), model=model, tags="dress")
        assert status == 200, answer
        assert (answer["model"], answer["variant"], answer["query_tags"]) == (model, variant, ["dress"])
        code, out, err = run_cli(capsys, "search", str(directory), str(image), "--k", "4", "--tags", "dress", "--json",
                                 *(["--masked"] if masked else []))  # fmt: skip
        assert code == 0, err
        expected = json.loads(out)[0]["neighbours"]
        assert [n["key"] for n in answer["neighbours"]] == [n["key"] for n in expected] and expected[0]["key"] == key
        for got, want in zip(answer["neighbours"], expected):
            assert got["distance"] == pytest.approx(want["distance"], rel=1e-4, abs=1e-6)
            assert (got["tags"], got["label_iou"], got["rank"]) == (want["tags"], want["label_iou"], want["rank"])
            status, headers, data = request(server, "GET", got["thumb"])
            assert status == 200 and data == train_members[got["key"]]["jpg"] and headers["content-type"] == "image/jpeg"
    status, _, body = request(server, "GET", "/examples?n=5")
    examples = json.loads(body)["examples"]
    classes = models["classifier"]["classes"]
    assert status == 200 and len(examples) == 5 and len({e["key"] for e in examples}) == 5
    for example in examples:
        assert example["tags"] == [classes[i] for i in json.loads(val_members[example["key"]]["json"])["labels"]]
        assert request(server, "GET", example["thumb"])[2] == val_members[example["key"]]["jpg"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost none: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def post_chunked(url: str, body: bytes, content_type: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        try:
            conn.request("POST", "/search", body=(body[i : i + 65536] for i in range(0, len(body), 65536)),
                         headers={"Content-Type": content_type}, encode_chunked=True)  # fmt: skip
        except (BrokenPipeError, ConnectionResetError):
            pass
        return conn.getresponse().status
    finally:
        conn.close()


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, study, train_members):
    good = train_members[keys_of(index_dir(study, "classifier", "original"))[2]]["jpg"]
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = tmp_png(noise)
    assert len(big) > 1024 * 1024
    for image, fields, status, message in [
        (b"GIF89a not really", {}, 400, "not an image"),
        (good[: len(good) // 2], {}, 400, "image file is truncated"),
        (png_header_only(30000, 30000), {}, 400, "an image of more than the"),
        (png_header_only(10000, 10000), {}, 400, "an image of more than the"),
        (good, {"k": "many"}, 400, "k: Input should be a valid integer"),
        (good, {"k": 500}, 400, "k=500: choose 1 to 100"),
        (good, {"model": "resnet"}, 400, "no model 'resnet' here; served: classifier, rotation"),
        (good, {"tags": "hta"}, 400, "unknown tag 'hta' (did you mean 'hat'?)"),
    ]:  # fmt: skip
        got, answer = post_search(server, image, **fields)
        assert got == status and message in answer["error"], answer
    body, content_type = form_data(big)
    assert request(server, "POST", "/search", body, {"Content-Type": content_type})[0] == 413
    assert post_chunked(server, body, content_type) == 413
    missing = request(server, "POST", "/search", b"", {"Content-Type": "multipart/form-data; boundary=x"})
    assert missing[0] == 400 and json.loads(missing[2])["error"]
    for path in ["/thumb/nope", "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/" + "k" * 300, "/docs", "/web/", "/imret/"]:
        status, headers, data = request(server, "GET", path)
        assert status == 404 and headers["content-type"] == "application/json" and json.loads(data)["error"], path
    status, answer = post_search(server, good, k=1)
    assert status == 200 and answer["neighbours"][0]["distance"] < 1e-6
    assert request(server, "GET", "/healthz")[0] == 200


def tmp_png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_queries_each_get_their_own_answer(server, study, train_members):
    keys = keys_of(index_dir(study, "classifier", "original"))
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        answers[i] = post_search(server, train_members[keys[i]]["jpg"], k=2)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answers[i][0] == 200 and answers[i][1]["neighbours"][0]["key"] == keys[i] for i in range(16))


# ---------------------------------------------------------------- the page in a real browser


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]'): the page is not tested in a browser")
    executable = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable or not Path(executable).is_file():
        pytest.skip("no Chromium here (apt-get install chromium): the page is not tested in a browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors


def grid_after(page, model: str, variant: str) -> list[dict]:
    """Wait until the grid shows a finished search of this model and variant with every image decoded."""
    page.wait_for_function(
        """([model, variant]) => { const g = document.querySelector('#grid');
             return g.dataset.state === 'ready' && g.dataset.model === model && g.dataset.variant === variant
                 && [...g.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0); }""",
        arg=[model, variant], timeout=60_000)  # fmt: skip
    return page.eval_on_selector_all("#grid figure.result", """figures => figures.map(f => ({key: f.dataset.key,
        distance: f.querySelector('.distance').textContent, iou: f.querySelector('.iou').textContent}))""")


def test_the_page_shows_the_neighbours_the_api_returns(page, server, study, train_members, tmp_path):
    key = keys_of(index_dir(study, "classifier", "original"))[4]
    image = tmp_path / "query.jpg"
    image.write_bytes(train_members[key]["jpg"])
    page.goto(server + "/")
    page.wait_for_selector("#model option[value=classifier]", state="attached")
    page.select_option("#model", "classifier")
    page.fill("#k", "6")
    page.set_input_files("#file", str(image))
    shown = grid_after(page, "classifier", "original")
    _, api = post_search(server, image.read_bytes(), k=6, model="classifier")
    assert [s["key"] for s in shown] == [n["key"] for n in api["neighbours"]] and shown[0]["key"] == key
    assert [s["distance"] for s in shown] == [f"d {n['distance']:.3f}" for n in api["neighbours"]]
    page.check("#masked")
    shown = grid_after(page, "classifier", "masked")
    _, api = post_search(server, image.read_bytes(), k=6, model="classifier", masked="true")
    assert [s["key"] for s in shown] == [n["key"] for n in api["neighbours"]]
    screenshot = tmp_path / "search-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as shot:
        assert shot.size[0] == 1200 and shot.size[1] >= 800


def test_an_example_is_searched_with_its_tags_and_a_dropped_image_too(page, server, study, train_members):
    page.goto(server + "/")
    page.wait_for_selector("#model option", state="attached")
    page.wait_for_selector("#examples button.example img", state="attached")
    example_key = page.get_attribute("#examples button.example", "data-key")
    page.click("#examples button.example")
    model = page.input_value("#model")
    shown = grid_after(page, model, "original")
    tags = page.input_value("#tags")
    example = request(server, "GET", f"/thumb/{example_key}")[2]
    _, api = post_search(server, example, k=5, model=model, tags=tags)
    assert [s["key"] for s in shown] == [n["key"] for n in api["neighbours"]]
    # the page rounds with JavaScript's toFixed (0.125 -> 0.13), Python's format rounds half to even (-> 0.12)
    shown_iou = [float(s["iou"].removeprefix("IoU ")) for s in shown]
    assert shown_iou == pytest.approx([n["label_iou"] for n in api["neighbours"]], abs=0.0051)

    key = keys_of(index_dir(study, model, "original"))[9]
    data = list(train_members[key]["jpg"])
    transfer = page.evaluate_handle("""([bytes, name]) => { const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/jpeg'})); return dt; }""",
                                    [data, "drop.jpg"])  # fmt: skip
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_function("() => document.querySelector('#query-name').textContent === 'drop.jpg'")
    shown = grid_after(page, model, "original")
    assert shown[0]["key"] == key and page.input_value("#tags") == ""
