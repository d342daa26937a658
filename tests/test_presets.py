"""Dataset presets: every preset resolves offline, VTAB-1k splits match the protocol, derived
labels are right on hand-built examples, and one preset builds from files in its real format."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from jprompt.data import class_names, label_maps, pipeline, presets
from jprompt.tools import sweep
from jprompt.train import config_lib
from tests.helpers import ROOT, load_config

# The VTAB-1k protocol (task_adaptation's data/*.py, which VPT reuses): train800, val200, test
# split strings and class counts, written out by hand rather than derived.
VTAB_1K = {
    "vtab/caltech101": ("caltech101", "train[:800]", "train[2754:2954]", "test", 102),
    "vtab/cifar100": ("cifar100", "train[:800]", "train[45000:45200]", "test", 100),
    "vtab/dtd": ("dtd", "train[:800]", "validation[:200]", "test", 47),
    "vtab/oxford_flowers102": (
        "oxford_flowers102",
        "train[:800]",
        "validation[:200]",
        "test",
        102,
    ),
    "vtab/oxford_iiit_pet": ("oxford_iiit_pet", "train[:800]", "train[2944:3144]", "test", 37),
    "vtab/svhn": ("svhn_cropped", "train[:800]", "train[65931:66131]", "test", 10),
    "vtab/sun397": ("sun397/tfds", "train[:800]", "validation[:200]", "test", 397),
    "vtab/patch_camelyon": ("patch_camelyon", "train[:800]", "validation[:200]", "test", 2),
    "vtab/eurosat": ("eurosat/rgb", "train[:800]", "train[16200:16400]", "train[21600:]", 10),
    "vtab/resisc45": ("resisc45", "train[:800]", "train[18900:19100]", "train[25200:]", 45),
    "vtab/diabetic_retinopathy": (
        "diabetic_retinopathy_detection/btgraham-300",
        "train[:800]",
        "validation[:200]",
        "test",
        5,
    ),
    "vtab/clevr_count": ("clevr", "train[:800]", "train[63000:63200]", "validation", 8),
    "vtab/clevr_distance": ("clevr", "train[:800]", "train[63000:63200]", "validation", 6),
    "vtab/dmlab": ("dmlab", "train[:800]", "validation[:200]", "test", 6),
    "vtab/kitti_distance": ("kitti", "train[:800]", "validation[:200]", "test", 4),
    "vtab/dsprites_location": (
        "dsprites",
        "train[:800]",
        "train[589824:590024]",
        "train[663552:]",
        16,
    ),
    "vtab/dsprites_orientation": (
        "dsprites",
        "train[:800]",
        "train[589824:590024]",
        "train[663552:]",
        16,
    ),
    "vtab/smallnorb_azimuth": ("smallnorb", "train[:800]", "test[:200]", "test[50%:]", 18),
    "vtab/smallnorb_elevation": ("smallnorb", "train[:800]", "test[:200]", "test[50%:]", 9),
}


def test_vtab_1k_splits_and_classes_follow_the_protocol():
    assert set(presets.VTAB_TASKS) == set(VTAB_1K)
    for name, (tfds_name, train, val, test, classes) in VTAB_1K.items():
        preset = presets.get(name)
        assert (preset.tfds_name, preset.train, preset.val, preset.test) == (
            tfds_name,
            train,
            val,
            test,
        ), name
        assert preset.num_classes == classes, name
        assert preset.trainval == f"{train}+{val}", name
        # VPT's VTAB setting: resize to 224, no augmentation.
        assert (preset.train_crop, preset.eval_crop, preset.flip) == ("resize", "resize", False)
    groups = [presets.get(n).group for n in VTAB_1K]
    assert [groups.count(g) for g in ("vtab-natural", "vtab-specialized", "vtab-structured")] == [
        7,
        4,
        8,
    ]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_resolves_into_a_config(name):
    preset = presets.get(name)
    config = load_config("vpt.py", f"dataset={name}")
    assert config.dataset.preset == name
    assert config.dataset.name == preset.tfds_spec
    assert (config.dataset.train_split, config.dataset.val_split, config.dataset.test_split) == (
        preset.train,
        preset.val,
        preset.test,
    )
    assert config.dataset.val_split != config.dataset.test_split
    assert config.dataset.num_classes == preset.num_classes > 0
    assert config.dataset.label_map in label_maps.EXAMPLE_MAPS
    assert config.input.train_crop == preset.train_crop
    assert tfds.builder_cls(preset.tfds_name.split("/")[0])  # a builder tfds (or jprompt) has
    label_map = label_maps.example_map(preset.label_map)
    if label_map.num_classes:
        assert label_map.num_classes == preset.num_classes
    if isinstance(preset.class_names, tuple):
        assert len(preset.class_names) == preset.num_classes
        assert config.head.class_names == preset.class_names


def test_vtab_dtd_deep_config_from_the_preset():
    config = load_config("vpt.py", "dataset=vtab/dtd,deep")
    assert config.dataset.name == "dtd:3.*.*"
    assert (config.dataset.train_split, config.dataset.val_split) == (
        "train[:800]",
        "validation[:200]",
    )
    assert config.dataset.num_classes == 47 and config.method.deep
    final = load_config("vpt.py", "dataset=vtab/dtd,deep,trainval")
    assert final.dataset.train_split == "train[:800]+validation[:200]"
    assert config.selection == "val" and final.selection == "last"
    with pytest.raises(ValueError, match="'cifar10' has no trainval split; presets with one"):
        load_config("vpt.py", "dataset=cifar10,trainval")


def test_unknown_names():
    plain = presets.get("beans")  # any tfds name: default splits, tfds's labels
    assert (plain.tfds_spec, plain.train, plain.val, plain.num_classes) == (
        "beans",
        "train[:90%]",
        "train[90%:]",
        0,
    )
    with pytest.raises(ValueError, match=r"unknown preset 'vtab/dtdd'; did you mean \['vtab/dtd'"):
        presets.get("vtab/dtdd")
    with pytest.raises(ValueError, match="unknown label map 'clevr'; valid choices"):
        label_maps.example_map("clevr")


def _apply(label_map: str, example: dict):
    image, label = label_maps.example_map(label_map).fn(example)
    return image, int(label)


def _clevr(depths):
    n = len(depths)
    coords = tf.constant([[10.0, 20.0, d] for d in depths], tf.float32)
    return {
        "image": tf.constant(b"png"),
        "objects": {"size": tf.zeros([n]), "pixel_coords": coords},
    }


def test_clevr_labels_from_the_object_list():
    assert _apply("clevr_count", _clevr([9.0] * 3))[1] == 0  # 3 objects: first class
    assert _apply("clevr_count", _clevr([9.0] * 7)) == (b"png", 4)
    assert _apply("clevr_count", _clevr([9.0] * 10))[1] == 7
    assert label_maps.example_map("clevr_count").class_names[4] == "7"
    # Closest object's depth binned at 8, 8.5, 9, 9.5, 10.
    assert _apply("clevr_distance", _clevr([12.0, 7.9, 11.0]))[1] == 0
    assert _apply("clevr_distance", _clevr([12.0, 8.7]))[1] == 2
    assert _apply("clevr_distance", _clevr([10.5, 11.0]))[1] == 5


def _kitti(types, depths):
    location = tf.constant([[0.0, 1.0, d] for d in depths], tf.float32, shape=[len(depths), 3])
    return {"image": b"", "objects": {"type": tf.constant(types, tf.int64), "location": location}}


def test_kitti_closest_vehicle_distance():
    assert _apply("kitti_distance", _kitti([0, 4], [30.0, 2.0]))[1] == 2  # pedestrian ignored
    assert _apply("kitti_distance", _kitti([1, 2], [12.0, 5.0]))[1] == 0
    assert _apply("kitti_distance", _kitti([2, 0], [15.0, 9.0]))[1] == 1
    assert _apply("kitti_distance", _kitti([3, 5], [5.0, 5.0]))[1] == 3  # no vehicle
    assert _apply("kitti_distance", _kitti([], []))[1] == 3


def test_dsprites_and_smallnorb_labels():
    example = {
        "image": b"",
        "label_x_position": tf.constant(31, tf.int64),
        "label_orientation": tf.constant(39, tf.int64),
    }
    assert _apply("dsprites_location", example)[1] == 15
    assert _apply("dsprites_orientation", example)[1] == 15
    example["label_x_position"] = tf.constant(5, tf.int64)
    example["label_orientation"] = tf.constant(5, tf.int64)
    assert _apply("dsprites_location", example)[1] == 2
    assert _apply("dsprites_orientation", example)[1] == 2  # floor(5 / 2.5)
    # dSprites stores 0/1 pixels: decoded and scaled to 0/255, on three channels.
    png = tf.io.encode_png(tf.constant([[[0], [1]]], tf.uint8))
    decoded = label_maps.example_map("dsprites_location").decode(png).numpy()
    assert decoded.shape == (1, 2, 3) and decoded[0, 1].tolist() == [255] * 3
    norb = {"image": b"", "label_azimuth": tf.constant(17), "label_elevation": tf.constant(8)}
    assert _apply("smallnorb_azimuth", norb)[1] == 17
    assert _apply("smallnorb_elevation", norb)[1] == 8


def test_ucf101_middle_frame():
    frames = tf.constant([b"f0", b"f1", b"f2", b"f3", b"f4"])
    assert _apply("ucf101_middle_frame", {"video": frames, "label": 7}) == (b"f2", 7)


def test_clean_class_names():
    sun = presets.get("sun397").clean_class_names(["/a/abbey", "/b/bakery/shop"])
    assert sun == ("abbey", "bakery shop")
    ucf = presets.get("ucf101").clean_class_names(["ApplyEyeMakeup", "YoYo"])
    assert ucf == ("Apply Eye Makeup", "Yo Yo")
    assert presets.get("dtd").clean_class_names(["banded"]) == ("banded",)
    assert presets.get("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")
    assert len(set(class_names.CIFAR100_NAMES)) == 100


def test_with_args():
    assert config_lib.with_args("dataset=dtd,num_tokens=5,deep", num_tokens=50) == (
        "dataset=dtd,deep,num_tokens=50"
    )
    assert config_lib.with_args(None, prompt_size=5) == "prompt_size=5"


def test_sweeps_expand_with_lr_scaled_by_batch(tmp_path):
    config_file = str(ROOT / "configs" / "vpt.py")
    runs = sweep.expand(config_file, "dataset=vtab/dtd", "lr_wd", [0], tmp_path, {})
    assert len(runs) == 40
    lrs = sorted({r.overrides["optim.lr"] for r in runs})
    assert lrs[0] == pytest.approx(0.05 * 128 / 256) and lrs[-1] == pytest.approx(25.0)
    assert {r.overrides["optim.weight_decay"] for r in runs} == {0.01, 1e-3, 1e-4, 0.0}
    long = sweep.expand(config_file, "num_tokens=100", "lr_wd", [0], tmp_path, {})
    assert max(r.overrides["optim.lr"] for r in long) == pytest.approx(50 * 64 / 256)
    tokens = sweep.expand(config_file, "deep", "num_tokens", [0, 1], tmp_path, {})
    assert [r.arg for r in tokens[::2]] == [
        f"deep,num_tokens={p}" for p in (1, 5, 10, 50, 100, 200)
    ]
    assert [r.overrides["seed"] for r in tokens[:2]] == [0, 1]
    for file in ("vp.py", "adavipro.py"):
        sizes = sweep.expand(str(ROOT / "configs" / file), "", None, [0], tmp_path, {})
        assert [r.arg for r in sizes] == [f"prompt_size={p}" for p in (5, 30, 60, 90, 112)]
    with pytest.raises(
        ValueError, match=r"unknown config field 'num_epoch'; did you mean 'num_epochs'\?"
    ):
        sweep.expand(config_file, "", "seeds", [0], tmp_path, {"num_epoch": "1"})
    with pytest.raises(ValueError, match=r"unknown sweep 'lr'; valid choices: \['lr_wd'"):
        sweep.expand(config_file, "", "lr", [0], tmp_path, {})


# --- one preset built through tfds from files in the dataset's real source format ---

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _cifar10_archive(path, train_labels, test_labels):
    """A CIFAR-10 binary archive: per image 1 label byte + 3072 bytes of R, G, B planes."""

    def batch(labels, offset):
        records = []
        for i, label in enumerate(labels):
            planes = np.full((3, 32, 32), (offset + i) % 256, np.uint8)
            records.append(bytes([label]) + planes.tobytes())
        return b"".join(records)

    files = {"batches.meta.txt": "\n".join(class_names.CIFAR10_NAMES).encode() + b"\n"}
    per_file = len(train_labels) // 5
    for k in range(5):
        chunk = train_labels[k * per_file : (k + 1) * per_file]
        files[f"data_batch_{k + 1}.bin"] = batch(chunk, k * per_file)
    files["test_batch.bin"] = batch(test_labels, 200)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_cifar10_preset_from_a_real_format_archive(tmp_path, monkeypatch):
    train_labels = [i % 10 for i in range(50)]
    test_labels = [(3 * i) % 10 for i in range(20)]
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    archive = manual_dir / "cifar-10-binary.tar.gz"
    _cifar10_archive(archive, train_labels, test_labels)
    data = archive.read_bytes()
    # tfds takes a file from manual_dir in place of a download when it has the registered
    # name and checksum; register the tiny archive's, and make any real download fail.
    info = tfds.download.checksums.UrlInfo(
        size=len(data), checksum=hashlib.sha256(data).hexdigest(), filename=archive.name
    )
    builder_cls = tfds.builder_cls("cifar10")
    monkeypatch.setattr(builder_cls, "url_infos", {CIFAR10_URL: info})

    def no_network(self, resource):
        raise AssertionError(f"tried to download {resource.url}")

    monkeypatch.setattr(tfds.download.DownloadManager, "_download", no_network)

    preset = presets.get("cifar10")
    data_dir = str(tmp_path / "tfds")
    builder = tfds.builder(preset.tfds_spec, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    info = pipeline.dataset_info(preset.tfds_spec, preset.train, data_dir=data_dir)
    assert info.class_names == class_names.CIFAR10_NAMES  # read from batches.meta.txt
    assert info.num_classes == preset.num_classes == 10
    sizes = [
        pipeline.dataset_info(preset.tfds_spec, split, data_dir=data_dir).num_examples
        for split in (preset.train, preset.val, preset.test)
    ]
    assert sizes == [45, 5, 20]
    # Validation and train are disjoint and together the whole tfds train split; labels and
    # pixels are the ones written.
    seen = {}
    for split in (preset.train, preset.val):
        for ex in tfds.as_numpy(tfds.load(preset.tfds_spec, split=split, data_dir=data_dir)):
            assert ex["id"] not in seen
            seen[ex["id"]] = (int(ex["label"]), int(ex["image"][0, 0, 0]))
    assert sorted(seen) == [f"train_{i:05d}".encode() for i in range(50)]
    assert all(seen[f"train_{i:05d}".encode()] == (train_labels[i], i) for i in range(50))
    test = list(tfds.as_numpy(tfds.load(preset.tfds_spec, split=preset.test, data_dir=data_dir)))
    assert sorted(int(e["label"]) for e in test) == sorted(test_labels)


def test_manual_download_message_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        pipeline.load_builder(presets.get("fgvc/stanford_cars").tfds_spec, str(tmp_path))
    message = str(error.value)
    for name in ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "fgvc/stanford_cars"):
        assert name in message
    assert str(tmp_path / "downloads" / "manual") in message


def test_local_folder_builder(tmp_path):
    root = tmp_path / "downloads" / "manual" / "nabirds"
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("b_wren", "a_finch"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((6, 5, 3), i, np.uint8)).save(
                    root / split / cls / f"{i}.png"
                )
    builder = pipeline.load_builder(presets.get("fgvc/nabirds").tfds_spec, str(tmp_path))
    assert builder.info.features["label"].names == ["a_finch", "b_wren"]
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
        "train": 6,
        "test": 4,
    }


def test_coop_split_file_decides_splits_labels_and_names(tmp_path):
    folder = tmp_path / "downloads" / "manual" / "coop" / "dtd"
    textures = ["banded", "zigzagged"]  # label order, as in the split file
    written = [("train", 0), ("train", 1), ("train", 0), ("val", 1), ("test", 0), ("test", 1)]
    entries = {"train": [], "val": [], "test": []}
    expected = {"train": [], "val": [], "test": []}  # (label, pixel value) per split
    for i, (split, label) in enumerate(written):
        path = f"{textures[label]}/{textures[label]}_{i}.png"
        (folder / "images" / textures[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 5, 3), 30 * i, np.uint8)).save(folder / "images" / path)
        entries[split].append([path, label, textures[label]])
        expected[split].append((label, 30 * i))
    (folder / "split_zhou_DescribableTextures.json").write_text(json.dumps(entries))

    preset = presets.get("coop/dtd")
    assert (preset.train, preset.val, preset.test, preset.num_classes) == (
        "train",
        "validation",
        "test",
        47,
    )
    builder = pipeline.load_builder(preset.tfds_spec, str(tmp_path))
    assert builder.info.features["label"].names == textures
    for split, coop_split in (("train", "train"), ("validation", "val"), ("test", "test")):
        ds = builder.as_dataset(split=split, shuffle_files=False)
        read = sorted((int(e["label"]), int(e["image"][0, 0, 0])) for e in tfds.as_numpy(ds))
        assert read == sorted(expected[coop_split]), split


def test_missing_coop_folder_says_what_to_copy_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        pipeline.load_builder(presets.get("coop/dtd").tfds_spec, str(tmp_path))
    message = str(error.value)
    assert f"{tmp_path}/downloads/manual" in message
    assert "copy CoOp's dtd folder (split_zhou_DescribableTextures.json and images/)" in message
