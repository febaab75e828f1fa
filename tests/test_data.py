"""`hf_rwsam.data` loaders, transforms and collator, offline.

The Hub datasets are replaced by local copies in their own schema (column names, features, class names, split file
layout) that the tests write; digits are scikit-learn's real images.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDatasetDict
from PIL import Image as PILImage
from sklearn.datasets import load_digits

from hf_rwsam.data import (
    DataUnavailableError,
    add_label_noise,
    collate_images,
    image_transforms,
    label_noise_info,
    load_image_dataset,
    prepare_dataset,
)

from utils import TinyCNN, sgd_config

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FINE_NAMES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch cra crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_COARSE_NAMES = """aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores large_man-made_outdoor_things
large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles
small_mammals trees vehicles_1 vehicles_2""".split()
# (fine, coarse) pairs of real CIFAR-100 rows: cattle / large omnivores, dinosaur / reptiles, apple / fruit,
# boy / people, aquarium_fish / fish, telephone / household electrical devices.
CIFAR100_ROWS = [(19, 11), (29, 15), (0, 4), (11, 14), (1, 1), (86, 5)]

CIFAR10_MEAN, CIFAR10_STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
CIFAR100_MEAN, CIFAR100_STD = np.array([0.5071, 0.4865, 0.4409]), np.array([0.2673, 0.2564, 0.2762])
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def random_images(n, shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_local_copy(dataset: DatasetDict, directory, layout: str, config: str):
    """A local copy as `save_to_disk` writes it, or as the Hub repository's files (``config/split-*.parquet``)."""
    if layout == "save_to_disk":
        dataset.save_to_disk(str(directory))
    else:
        for split, ds in dataset.items():
            ds.to_parquet(str(directory / config / f"{split}-00000-of-00001.parquet"))
    return directory


def image_digest(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_cifar10_local_copy(tmp_path, layout):
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_NAMES)})
    pixels = {"train": random_images(6, seed=1), "test": random_images(4, seed=2)}
    labels = {"train": [9, 0, 3, 5, 1, 3], "test": [2, 4, 8, 7]}
    hub = DatasetDict(
        {s: Dataset.from_dict({"img": list(pixels[s]), "label": labels[s]}, features=features) for s in pixels}
    )
    copy = write_local_copy(hub, tmp_path / "cifar10", layout, config="plain_text")

    dataset = load_image_dataset("cifar10", path=copy, cache_dir=str(tmp_path / "cache"))

    assert isinstance(dataset, DatasetDict) and set(dataset) == {"train", "test"}
    for split in ("train", "test"):
        ds = dataset[split]
        assert ds.column_names == ["img", "label"]
        assert isinstance(ds.features["img"], Image)
        assert ds.features["label"].names == CIFAR10_NAMES
        assert ds["label"][:] == labels[split]
        for row, expected in zip(ds, pixels[split]):
            np.testing.assert_array_equal(np.asarray(row["img"]), expected)


def test_cifar100_fine_label_becomes_label_and_coarse_label_is_kept(tmp_path):
    features = Features(
        {
            "img": Image(),
            "fine_label": ClassLabel(names=CIFAR100_FINE_NAMES),
            "coarse_label": ClassLabel(names=CIFAR100_COARSE_NAMES),
        }
    )
    fine, coarse = map(list, zip(*CIFAR100_ROWS))
    pixels = random_images(len(fine), seed=3)
    split = Dataset.from_dict({"img": list(pixels), "fine_label": fine, "coarse_label": coarse}, features=features)
    hub = DatasetDict(train=split, test=split.select([0, 1]))
    copy = write_local_copy(hub, tmp_path / "c100", "parquet", config="cifar100")

    dataset = load_image_dataset("cifar100", path=copy, cache_dir=str(tmp_path / "cache"))

    train = dataset["train"]
    assert sorted(train.column_names) == ["coarse_label", "img", "label"]
    assert len(CIFAR100_FINE_NAMES) == 100 and len(CIFAR100_COARSE_NAMES) == 20
    assert train.features["label"].names == CIFAR100_FINE_NAMES
    assert train.features["coarse_label"].names == CIFAR100_COARSE_NAMES
    assert train["label"][:] == fine and train["coarse_label"][:] == coarse
    assert train.features["label"].int2str(train[0]["label"]) == "cattle"
    np.testing.assert_array_equal(np.asarray(train[5]["img"]), pixels[5])
    assert len(dataset["test"]) == 2


@pytest.fixture
def imagenet_copy(tmp_path):
    """ImageNet-1k's Hub layout (``data/{train,validation,test}-*.parquet``, columns ``image`` and ``label``; the test
    split is unlabelled, -1) with images of several sizes and modes, as in the real data."""
    features = Features({"image": Image(), "label": ClassLabel(names=["tench", "goldfish", "great white shark"])})
    rng = np.random.default_rng(4)
    images = [
        PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for h, w, mode in [(40, 60, "RGB"), (64, 48, "L"), (50, 50, "RGB"), (30, 70, "CMYK")]
    ]
    hub = DatasetDict(
        train=Dataset.from_dict({"image": images, "label": [0, 1, 2, 1]}, features=features),
        validation=Dataset.from_dict({"image": images[:2], "label": [2, 0]}, features=features),
        test=Dataset.from_dict({"image": images[2:], "label": [-1, -1]}, features=features),
    )
    return write_local_copy(hub, tmp_path / "imagenet", "parquet", config="data"), images


def test_imagenet_image_becomes_img(tmp_path, imagenet_copy):
    copy, images = imagenet_copy
    dataset = load_image_dataset("imagenet-1k", path=copy, cache_dir=str(tmp_path / "cache"))

    assert set(dataset) == {"train", "validation", "test"}
    assert dataset["train"].column_names == ["img", "label"]
    assert dataset["train"].features["label"].names == ["tench", "goldfish", "great white shark"]
    assert dataset["validation"]["label"][:] == [2, 0] and dataset["test"]["label"][:] == [-1, -1]
    assert [image_digest(row["img"]) for row in dataset["train"]] == [image_digest(image) for image in images]


def test_imagenet_streaming_from_a_local_copy(tmp_path, imagenet_copy):
    copy, images = imagenet_copy
    dataset = load_image_dataset("imagenet-1k", path=copy, streaming=True)

    assert isinstance(dataset, IterableDatasetDict) and set(dataset) == {"train", "validation", "test"}
    rows = list(dataset["train"])
    assert [sorted(row) for row in rows] == [["img", "label"]] * 4
    assert [row["label"] for row in rows] == [0, 1, 2, 1]
    assert [image_digest(row["img"]) for row in rows] == [image_digest(image) for image in images]
    # The training transform streams too: every mode (L, CMYK) becomes a 3 x 224 x 224 tensor.
    prepared = prepare_dataset(dataset["train"], "imagenet-1k", train=True)
    batch = collate_images(list(prepared))
    assert batch["pixel_values"].shape == (4, 3, 224, 224) and batch["labels"].tolist() == [0, 1, 2, 1]


def test_save_to_disk_copy_can_be_streamed(tmp_path):
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_NAMES)})
    hub = DatasetDict(train=Dataset.from_dict({"img": list(random_images(3)), "label": [1, 2, 3]}, features=features))
    copy = write_local_copy(hub, tmp_path / "c10", "save_to_disk", config="")
    dataset = load_image_dataset("cifar10", path=copy, streaming=True)
    assert isinstance(dataset, IterableDatasetDict)
    assert [row["label"] for row in dataset["train"]] == [1, 2, 3]


def test_image_folder(tmp_path):
    rng = np.random.default_rng(5)
    written = Counter()
    for label in ("cat", "dog"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            PILImage.fromarray(pixels).save(tmp_path / "pets" / label / f"{i}.png")
            written[(label, image_digest(pixels))] += 1

    dataset = load_image_dataset(str(tmp_path / "pets"), cache_dir=str(tmp_path / "cache"))

    train = dataset["train"]
    assert train.column_names == ["img", "label"] and train.features["label"].names == ["cat", "dog"]
    loaded = Counter((train.features["label"].int2str(row["label"]), image_digest(row["img"])) for row in train)
    assert loaded == written


def test_digits_are_scikit_learns_images_split_80_20():
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)

    dataset = load_image_dataset("digits")

    train, test = dataset["train"], dataset["test"]
    assert (len(train), len(test)) == (1437, 360)
    assert train.features["label"].names == [str(d) for d in range(10)]
    assert isinstance(train.features["img"], Image)
    assert {row["img"].size for row in train} == {(8, 8)} and train[0]["img"].mode == "L"
    # The two splits partition the 1797 (image, label) pairs of scikit-learn's digits.
    pairs = Counter((image_digest(row["img"]), row["label"]) for split in (train, test) for row in split)
    assert pairs == Counter((image_digest(image), int(label)) for image, label in zip(expected, digits.target))
    # Stratified: each class has 20 % of its images in test, up to rounding.
    per_class = np.bincount(digits.target, minlength=10)
    assert np.abs(np.bincount(test["label"][:], minlength=10) - 0.2 * per_class).max() <= 1


def test_digits_split_is_the_same_every_time():
    first, second = load_image_dataset("digits"), load_image_dataset("digits")
    for split in ("train", "test"):
        assert first[split]["label"][:] == second[split]["label"][:]
        assert [image_digest(r["img"]) for r in first[split]] == [image_digest(r["img"]) for r in second[split]]


@pytest.mark.timeout(30)
def test_unreachable_hub_dataset_raises_a_clear_error():
    with pytest.raises(DataUnavailableError) as info:
        load_image_dataset("cifar10")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for hint in ("'cifar10'", "uoft-cs/cifar10", "HF_DATASETS_OFFLINE", "path=", "save_to_disk"):
        assert hint in message, hint


def test_invalid_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar-10'"):
        load_image_dataset("cifar-10")
    with pytest.raises(ValueError, match="not a directory"):
        load_image_dataset("cifar10", path=tmp_path / "missing")
    with pytest.raises(ValueError, match="takes no `path`"):
        load_image_dataset("digits", path=tmp_path)
    wrong = DatasetDict(train=Dataset.from_dict({"pixels": [[0.0]], "target": [1]}))
    wrong.save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="needs an 'img' Image column"):
        load_image_dataset(str(tmp_path / "wrong"))


# ------------------------------------------------------------------------------------------------------- transforms


def normalized(pixels: np.ndarray, mean, std) -> np.ndarray:
    """[H, W, C] uint8 -> [C, H, W] float: the independent reference for ToTensor + Normalize."""
    return ((pixels.astype(np.float64) / 255 - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "name, mean, std", [("cifar10", CIFAR10_MEAN, CIFAR10_STD), ("cifar100", CIFAR100_MEAN, CIFAR100_STD)]
)
def test_cifar_eval_transform_normalises_with_the_dataset_statistics(name, mean, std):
    pixels = random_images(1, seed=6)[0]
    out = image_transforms(name, train=False)(PILImage.fromarray(pixels))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), normalized(pixels, mean, std), atol=1e-5)


def test_cifar_train_transform_is_a_padded_random_crop_and_flip():
    """Every output is one of the 9 x 9 crops of the 4-pixel black-padded image, flipped or not; over 200 draws
    (seeded) every offset 0..8 and both flips occur, which a smaller padding or a missing flip would not give."""
    pixels = random_images(1, seed=7)[0]
    padded = np.broadcast_to((-CIFAR10_MEAN / CIFAR10_STD)[:, None, None], (3, 40, 40)).copy()  # black padding
    padded[:, 4:36, 4:36] = normalized(pixels, CIFAR10_MEAN, CIFAR10_STD)
    keys = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)]
    candidates = np.stack([padded[:, dy : dy + 32, dx : dx + 32][..., :: -1 if flip else 1] for dy, dx, flip in keys])
    transform = image_transforms("cifar10", train=True)
    torch.manual_seed(0)
    seen = []
    for _ in range(200):
        out = transform(PILImage.fromarray(pixels)).numpy()
        matches = np.flatnonzero(np.abs(candidates - out).max(axis=(1, 2, 3)) < 1e-5)
        assert len(matches) == 1, [keys[i] for i in matches]
        seen.append(keys[matches[0]])
    dys, dxs, flips = map(set, zip(*seen))
    assert dys == dxs == set(range(9)) and flips == {0, 1}


@pytest.mark.parametrize("name", ["imagenet-1k", "folder"])
def test_imagenet_transforms_crop_224_and_normalise(tmp_path, name):
    """A uniform image stays uniform under any resize / crop, so the output is exactly the normalised colour."""
    name = str(tmp_path) if name == "folder" else name
    color = np.array([200, 30, 90], dtype=np.uint8)
    image = PILImage.fromarray(np.tile(color, (300, 180, 1)))
    expected = (color / 255 - IMAGENET_MEAN) / IMAGENET_STD
    for train in (True, False):
        out = image_transforms(name, train=train)(image)
        assert out.shape == (3, 224, 224)
        np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(out.std(dim=(1, 2)).numpy(), 0, atol=1e-4)


def test_imagenet_eval_is_resize_256_center_crop_224():
    """A 256 x 512 image: the resize keeps 256 x 512, the center crop takes columns 144..368 (reference in numpy)."""
    pixels = random_images(1, shape=(256, 512, 3), seed=8)[0]
    out = image_transforms("imagenet-1k", train=False)(PILImage.fromarray(pixels)).numpy()
    np.testing.assert_allclose(out, normalized(pixels[16:240, 144:368], IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)


def test_digits_statistics_and_channels():
    digits = load_digits()
    gray = np.rint(digits.images * 255 / 16) / 255
    pixels = np.rint(digits.images[0] * 255 / 16).astype(np.uint8)
    image = PILImage.fromarray(pixels, mode="L")

    native = image_transforms("digits", train=False, image_size=8, num_channels=1)(image)
    # The transform's normalisation is the data's own gray-level mean / std (to the 4 decimals of the constants).
    np.testing.assert_allclose(native[0].numpy(), (pixels / 255 - gray.mean()) / gray.std(), atol=2e-3)
    assert native.shape == (1, 8, 8)
    rgb = image_transforms("digits", train=True, image_size=16, num_channels=3)(image)
    assert rgb.shape == (3, 16, 16) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[2])
    assert image_transforms("digits", train=False)(image).shape == (3, 32, 32)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="num_channels=1"):
        image_transforms("cifar10", train=True, num_channels=1)
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        image_transforms("mnist", train=True)


# --------------------------------------------------------------------------------------------- datasets and batches


@pytest.fixture(scope="module")
def noisy_digits():
    return add_label_noise(load_image_dataset("digits")["train"], "symmetric", rate=0.3, seed=0)


def test_prepared_dataset_and_collator(noisy_digits):
    prepared = prepare_dataset(noisy_digits, "digits", train=True, image_size=16, num_channels=1)

    assert sorted(prepared.column_names) == ["clean_label", "is_noisy", "label", "pixel_values"]
    assert label_noise_info(prepared) == label_noise_info(noisy_digits)
    batch = collate_images([prepared[i] for i in range(5)])

    assert set(batch) == {"pixel_values", "labels", "is_noisy"}
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (5, 1, 16, 16)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == noisy_digits["label"][:5]
    assert batch["is_noisy"].dtype == torch.bool and batch["is_noisy"].tolist() == noisy_digits["is_noisy"][:5]
    clean = noisy_digits["clean_label"][:5]
    assert batch["is_noisy"].tolist() == [label != c for label, c in zip(batch["labels"].tolist(), clean)]


def test_collator_without_noise_column():
    test = prepare_dataset(load_image_dataset("digits")["test"], "digits", train=False, image_size=8)
    batch = collate_images([test[i] for i in range(3)])
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["labels"].tolist() == test["label"][:3]


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_trainer_reads_prepared_digits(tmp_path, noisy_digits, remove_unused_columns):
    """The prepared dataset and the collator feed `RWSAMTrainer`, whose noisy-weight diagnostic needs `is_noisy`."""
    from hf_rwsam import RWSAMTrainer

    train = prepare_dataset(noisy_digits.select(range(64)), "digits", train=True, image_size=8, num_channels=1)
    args = sgd_config(tmp_path, sam_mode="rwsam", max_steps=2, per_device_train_batch_size=16,
                      remove_unused_columns=remove_unused_columns)
    trainer = RWSAMTrainer(model=TinyCNN(num_classes=10), args=args, train_dataset=train, data_collator=collate_images)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(0 <= entry["rwsam/noisy_weight_mass"] <= 1 for entry in logs)
