"""`add_label_noise` and `label_noise_info`: noise models checked against the definitions, on 20,000 labels.

Tolerances: a class of ~2,000 samples flipped with probability r has a flip fraction with standard deviation
sqrt(r (1 - r) / 2000) <= 0.0112, so +-0.05 is > 4 standard deviations; fixed seeds make every test deterministic.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value, load_from_disk
from scipy.stats import chi2
from sklearn.metrics import confusion_matrix

from hf_rwsam.data import DataUnavailableError, add_label_noise, label_noise_info

N = 20_000
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MAP = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
# CIFAR-100's superclass of each fine class, by fine index (the dataset's own coarse_label).
CIFAR100_COARSE = np.array(
    [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
     0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
     10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
     18, 1, 2, 15, 6, 0, 17, 8, 14, 13]
)  # fmt: skip


def labelled(labels, names=None, num_classes=10, column="label", **extra) -> Dataset:
    class_label = ClassLabel(names=names) if names else ClassLabel(num_classes=num_classes)
    features = Features({"row": Value("int64"), column: class_label, **{k: v[1] for k, v in extra.items()}})
    columns = {"row": np.arange(len(labels)), column: labels, **{k: v[0] for k, v in extra.items()}}
    return Dataset.from_dict(columns, features=features)


def uniform_labels(n=N, num_classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, n)


@pytest.fixture(scope="module")
def cifar10_like():
    return labelled(uniform_labels(), names=CIFAR10_NAMES)


def columns(dataset):
    return np.array(dataset["clean_label"][:]), np.array(dataset["label"][:]), np.array(dataset["is_noisy"][:])


def flip_fractions(clean, noisy, num_classes):
    return np.array([np.mean(noisy[clean == c] != c) for c in range(num_classes)])


# ------------------------------------------------------------------------------------------------------ noise models


def test_symmetric_flips_exactly_rate_n_uniformly_to_other_classes(cifar10_like):
    noisy_ds = add_label_noise(cifar10_like, "symmetric", rate=0.4, seed=0)
    clean, noisy, is_noisy = columns(noisy_ds)

    np.testing.assert_array_equal(clean, cifar10_like["label"][:])
    np.testing.assert_array_equal(noisy_ds["row"][:], np.arange(N))  # other columns and the row order are kept
    np.testing.assert_array_equal(is_noisy, noisy != clean)
    assert is_noisy.sum() == round(0.4 * N) == 8000  # every chosen sample changes class: never to its own
    np.testing.assert_allclose(flip_fractions(clean, noisy, 10), 0.4, atol=0.05)
    # Among the flips of each class, the 9 other classes are equally likely: Pearson's chi-square over the 10 x 9
    # off-diagonal counts (80 degrees of freedom) is not significant at 0.1 %.
    counts = confusion_matrix(clean[is_noisy], noisy[is_noisy], labels=range(10))
    off_diagonal = counts[~np.eye(10, dtype=bool)].reshape(10, 9)
    expected = off_diagonal.sum(axis=1, keepdims=True) / 9
    statistic = ((off_diagonal - expected) ** 2 / expected).sum()
    assert chi2.sf(statistic, df=10 * 8) > 1e-3, statistic
    assert noisy_ds.features["label"] == noisy_ds.features["clean_label"] == cifar10_like.features["label"]
    assert noisy_ds.features["is_noisy"] == Value("bool")


@pytest.mark.parametrize("names", [CIFAR10_NAMES, CIFAR10_NAMES[::-1]], ids=["hub-order", "reversed"])
def test_asymmetric_cifar10_follows_the_map_by_class_name(names):
    noisy_ds = add_label_noise(labelled(uniform_labels(), names=names), "asymmetric", rate=0.4, seed=1)
    clean, noisy, is_noisy = columns(noisy_ds)
    name = noisy_ds.features["label"].int2str

    changes = {(name(int(c)), name(int(n))) for c, n in zip(clean[is_noisy], noisy[is_noisy])}
    assert changes == set(CIFAR10_MAP.items())
    fractions = flip_fractions(clean, noisy, 10)
    for c in range(10):
        assert fractions[c] == pytest.approx(0.4 if name(c) in CIFAR10_MAP else 0.0, abs=0.05)


def test_asymmetric_cifar100_flips_to_the_next_class_of_the_superclass():
    fine = uniform_labels(num_classes=100, seed=2)
    coarse_label = ClassLabel(num_classes=20)
    dataset = labelled(fine, num_classes=100, coarse_label=(CIFAR100_COARSE[fine], coarse_label))
    noisy_ds = add_label_noise(dataset, "asymmetric", rate=0.4, seed=2)
    clean, noisy, is_noisy = columns(noisy_ds)

    target = {}
    for superclass in range(20):
        members = [f for f in range(100) if CIFAR100_COARSE[f] == superclass]
        assert len(members) == 5
        target.update({f: members[(i + 1) % 5] for i, f in enumerate(members)})
    assert all(target[int(c)] == int(n) for c, n in zip(clean[is_noisy], noisy[is_noisy]))
    assert {int(c) for c in clean[is_noisy]} == set(range(100))  # every class has a target of its own superclass
    assert is_noisy.mean() == pytest.approx(0.4, abs=0.02)  # 20,000 draws: sd 0.0035
    assert noisy_ds["coarse_label"][:] == dataset["coarse_label"][:]


def test_asymmetric_refuses_a_fine_class_in_two_superclasses():
    dataset = labelled([0, 0, 1], num_classes=3, coarse_label=([0, 1, 1], ClassLabel(num_classes=2)))
    with pytest.raises(ValueError, match="several"):
        add_label_noise(dataset, "asymmetric", rate=0.5, seed=0)


def test_asymmetric_needs_a_mapping_for_other_datasets():
    dataset = labelled(uniform_labels(), num_classes=10)
    with pytest.raises(ValueError, match="mapping="):
        add_label_noise(dataset, "asymmetric", rate=0.4, seed=0)

    clean, noisy, is_noisy = columns(add_label_noise(dataset, "asymmetric", rate=0.4, seed=0, mapping={3: 7, 7: 0}))
    assert {(int(c), int(n)) for c, n in zip(clean[is_noisy], noisy[is_noisy])} == {(3, 7), (7, 0)}
    np.testing.assert_allclose(flip_fractions(clean, noisy, 10)[[3, 7]], 0.4, atol=0.05)
    with pytest.raises(ValueError, match="outside 0..9"):
        add_label_noise(dataset, "asymmetric", rate=0.4, seed=0, mapping={3: 10})


def test_pairflip_moves_each_class_to_the_next(cifar10_like):
    clean, noisy, is_noisy = columns(add_label_noise(cifar10_like, "pairflip", rate=0.3, seed=3))
    np.testing.assert_array_equal(noisy[is_noisy], (clean[is_noisy] + 1) % 10)
    np.testing.assert_allclose(flip_fractions(clean, noisy, 10), 0.3, atol=0.05)


@pytest.mark.parametrize("noise_type", ["symmetric", "asymmetric", "pairflip"])
def test_noise_is_reproducible_from_the_seed(cifar10_like, noise_type):
    def training_labels(seed):
        return add_label_noise(cifar10_like, noise_type, rate=0.4, seed=seed)["label"][:]

    assert training_labels(0) == training_labels(0)
    assert training_labels(0) != training_labels(1)


def test_rate_zero_and_one(cifar10_like):
    assert not any(add_label_noise(cifar10_like, "symmetric", rate=0.0, seed=0)["is_noisy"][:])
    assert all(add_label_noise(cifar10_like, "symmetric", rate=1.0, seed=0)["is_noisy"][:])


def test_invalid_arguments(cifar10_like):
    with pytest.raises(ValueError, match="unknown noise_type='uniform'"):
        add_label_noise(cifar10_like, "uniform", rate=0.2)
    with pytest.raises(ValueError, match="rate=1.5"):
        add_label_noise(cifar10_like, "symmetric", rate=1.5)
    with pytest.raises(ValueError, match="rate=None"):
        add_label_noise(cifar10_like, "pairflip")
    with pytest.raises(ValueError, match="`mapping` is for noise_type='asymmetric'"):
        add_label_noise(cifar10_like, "symmetric", rate=0.2, mapping={0: 1})
    with pytest.raises(ValueError, match="must be a ClassLabel"):
        add_label_noise(cifar10_like, "symmetric", rate=0.2, label_column="row")
    with pytest.raises(ValueError, match="already has label noise"):
        add_label_noise(add_label_noise(cifar10_like, "symmetric", rate=0.2), "symmetric", rate=0.2)
    with pytest.raises(ValueError, match="map-style"):
        add_label_noise(cifar10_like.to_iterable_dataset(), "symmetric", rate=0.2)


# --------------------------------------------------------------------------------------------------- label_noise_info


def reference_info(dataset, label_column="label"):
    """Realised rate and row-normalised confusion matrix, computed with scikit-learn from the raw columns."""
    clean, labels = np.array(dataset["clean_label"][:]), np.array(dataset[label_column][:])
    num_classes = dataset.features["clean_label"].num_classes
    counts = confusion_matrix(clean, labels, labels=range(num_classes))
    rows = counts.sum(axis=1, keepdims=True)
    return float(np.mean(clean != labels)), np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)


def test_label_noise_info_matches_an_independent_computation(cifar10_like):
    noisy_ds = add_label_noise(cifar10_like, "asymmetric", rate=0.4, seed=4)
    info = label_noise_info(noisy_ds)

    assert set(info) == {"noise_type", "rate", "realized_rate", "transition_matrix", "num_classes"}
    assert (info["noise_type"], info["rate"], info["num_classes"]) == ("asymmetric", 0.4, 10)
    realized, matrix = reference_info(noisy_ds)
    assert info["realized_rate"] == pytest.approx(realized, abs=1e-12)
    assert isinstance(info["transition_matrix"], list)
    assert all(isinstance(row, list) for row in info["transition_matrix"])
    np.testing.assert_allclose(info["transition_matrix"], matrix, atol=1e-12)
    assert label_noise_info(cifar10_like) is None


def test_label_noise_info_survives_dataset_operations(cifar10_like, tmp_path):
    noisy_ds = add_label_noise(cifar10_like, "symmetric", rate=0.4, seed=5)
    noisy_ds.save_to_disk(str(tmp_path / "noisy"))
    # A subset without class 0: its row of the transition matrix is all zeros.
    without_class_0 = noisy_ds.filter(lambda batch: [c != 0 for c in batch["clean_label"]], batched=True)
    derived = {
        "select+shuffle": noisy_ds.shuffle(seed=0).select(range(3000)),
        "with_transform": noisy_ds.with_transform(lambda batch: {"row": batch["row"]}),
        "save_to_disk": load_from_disk(str(tmp_path / "noisy")),
        "filter": without_class_0,
    }
    for name, dataset in derived.items():
        info = label_noise_info(dataset)
        assert (info["noise_type"], info["rate"]) == ("symmetric", 0.4), name
        realized, matrix = reference_info(dataset.with_format(None))
        assert info["realized_rate"] == pytest.approx(realized, abs=1e-12), name
        np.testing.assert_allclose(info["transition_matrix"], matrix, atol=1e-12, err_msg=name)
    assert label_noise_info(without_class_0)["transition_matrix"][0] == [0.0] * 10
    assert cifar10_like.info.description == ""  # the source dataset's info is untouched
    with pytest.raises(ValueError, match="'clean_label'"):
        label_noise_info(noisy_ds.remove_columns("clean_label"))


def test_other_label_column(cifar10_like):
    dataset = labelled(uniform_labels(n=2000), names=CIFAR10_NAMES, column="target")
    noisy_ds = add_label_noise(dataset, "pairflip", rate=0.5, seed=0, label_column="target")
    assert sorted(noisy_ds.column_names) == ["clean_label", "is_noisy", "row", "target"]
    info = label_noise_info(noisy_ds)
    realized, matrix = reference_info(noisy_ds, label_column="target")
    assert info["realized_rate"] == pytest.approx(realized) and realized == pytest.approx(0.5, abs=0.05)
    np.testing.assert_allclose(info["transition_matrix"], matrix)


# ---------------------------------------------------------------------------------------------------- CIFAR-10N / 100N

CIFAR10N_KEYS = {
    "cifar10n-aggre": "aggre_label",
    "cifar10n-worst": "worse_label",
    "cifar10n-random1": "random_label1",
    "cifar10n-random2": "random_label2",
    "cifar10n-random3": "random_label3",
}


def save_label_file(path, contents, numpy1=False):
    """torch.save of a dict of numpy arrays, as the official files; ``numpy1`` writes numpy 1's module names (the
    official files predate numpy 2) in the legacy (plain pickle) format."""
    if not numpy1:
        torch.save(contents, path)
        return
    buffer = io.BytesIO()
    torch.save(contents, buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


@pytest.fixture
def cifar10n(tmp_path):
    clean = uniform_labels(n=500, seed=6)
    rng = np.random.default_rng(7)
    human = {key: np.where(rng.random(500) < p, rng.integers(0, 10, 500), clean)
             for key, p in zip(CIFAR10N_KEYS.values(), (0.1, 0.4, 0.2, 0.2, 0.2))}
    return labelled(clean, names=CIFAR10_NAMES), clean, human


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-file", "numpy1-file"])
def test_cifar10n_labels_come_from_the_file(tmp_path, cifar10n, numpy1):
    dataset, clean, human = cifar10n
    path = tmp_path / "CIFAR-10_human.pt"
    save_label_file(path, {"clean_label": clean, **human}, numpy1=numpy1)
    for noise_type, key in CIFAR10N_KEYS.items():
        noisy_ds = add_label_noise(dataset, noise_type, human_labels_path=path)
        np.testing.assert_array_equal(noisy_ds["label"][:], human[key])
        np.testing.assert_array_equal(noisy_ds["clean_label"][:], clean)
        info = label_noise_info(noisy_ds)
        assert info["noise_type"] == noise_type
        assert info["rate"] == info["realized_rate"] == pytest.approx(np.mean(human[key] != clean))


def test_cifar100n(tmp_path):
    clean = uniform_labels(n=300, num_classes=100, seed=8)
    noisy = np.where(np.arange(300) % 3 == 0, (clean + 5) % 100, clean)
    save_label_file(tmp_path / "CIFAR-100_human.pt", {"clean_label": clean, "noisy_label": noisy})
    dataset = labelled(clean, num_classes=100, coarse_label=(CIFAR100_COARSE[clean], ClassLabel(num_classes=20)))
    noisy_ds = add_label_noise(dataset, "cifar100n", human_labels_path=tmp_path / "CIFAR-100_human.pt")
    np.testing.assert_array_equal(noisy_ds["label"][:], noisy)
    assert label_noise_info(noisy_ds)["realized_rate"] == pytest.approx(1 / 3)


def test_cifar_n_refuses_labels_that_do_not_match(tmp_path, cifar10n):
    dataset, clean, human = cifar10n
    path = tmp_path / "CIFAR-10_human.pt"
    save_label_file(path, {"clean_label": clean, **human})
    changed = clean.copy()
    changed[17] = (changed[17] + 1) % 10
    with pytest.raises(ValueError, match="do not match.*1 of 500 labels differ"):
        add_label_noise(labelled(changed, names=CIFAR10_NAMES), "cifar10n-worst", human_labels_path=path)
    with pytest.raises(ValueError, match="do not match.*500 labels in the file, 100 in the dataset"):
        add_label_noise(dataset.select(range(100)), "cifar10n-worst", human_labels_path=path)
    with pytest.raises(ValueError, match="rate=0.4 is set by the human labels"):
        add_label_noise(dataset, "cifar10n-worst", rate=0.4, human_labels_path=path)
    with pytest.raises(ValueError, match="no \\['noisy_label'\\] entry"):
        add_label_noise(dataset, "cifar100n", human_labels_path=path)


@pytest.mark.timeout(30)
def test_cifar_n_offline_without_a_file_says_what_to_download(cifar10n):
    with pytest.raises(DataUnavailableError) as info:
        add_label_noise(cifar10n[0], "cifar10n-aggre")
    for hint in ("CIFAR-10_human.pt", "UCSC-REAL/cifar-10-100n", "human_labels_path="):
        assert hint in str(info.value), hint
