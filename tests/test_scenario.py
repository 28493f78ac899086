"""Stream building: equal splits, seeded draws, no reuse while unused images remain, val set, dir and tar folders."""

import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from cl_agent.scenario import (
    ImageFolder,
    ScenarioError,
    build_stream,
    load_scenario,
    parse_scenario,
    scenario_path,
    val_set,
)

N_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 6, 12, 3, 8


def make_folder(root: Path, as_tar: bool = False) -> Path:
    """Tiny image folder: pixel (R, G) = (40 * class, 10 * image number), flat colour, PNG so it is exact."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["index\twnid\trole\tname"]
    for c in range(N_CLASSES):
        rows.append(f"{c}\tn{c:08d}\t{'learnable' if c < 4 else 'distractor'}\tclass {c}")
    (root / "classes.tsv").write_text("\n".join(rows) + "\n")
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(N_CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for k in range(count):
                rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
                rgb[..., 0], rgb[..., 1] = 40 * c, 10 * k
                cv2.imwrite(str(folder / f"img_{k:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if as_tar:
            with tarfile.open(root / f"{split}.tar", "w") as tar:
                tar.add(root / split, arcname=split)
            for p in sorted((root / split).rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            (root / split).rmdir()
    return root


TABLE = {
    "name": "tiny",
    "num_classes": 6,
    "learnable_classes": 4,
    "labeled_per_experience": 8,
    "unlabeled_per_experience": 6,
    "experiences": [
        {"labeled_classes": [0, 1], "unlabeled_classes": [0, 1, 4]},
        {"labeled_classes": [1, 2, 3], "unlabeled_classes": [2, 5]},
        {"labeled_classes": [0, 1], "unlabeled_classes": [0, 1, 4]},
        {"labeled_classes": [0, 1], "unlabeled_classes": [0, 1, 4]},
    ],
}


def identity(images: np.ndarray) -> list[tuple[int, int]]:
    """(class, image number) of each synthetic image."""
    return [(int(im[0, 0, 0]) // 40, int(im[0, 0, 1]) // 10) for im in images]


@pytest.fixture(params=["dir", "tar"])
def folder(request, tmp_path) -> ImageFolder:
    return ImageFolder(make_folder(tmp_path / "data", as_tar=request.param == "tar"), SIZE)


def test_equal_splits_labels_and_shapes(folder):
    table = parse_scenario(TABLE)
    stream = list(build_stream(table, folder, seed=0))
    assert len(stream) == 4
    first, second = stream[0], stream[1]
    assert first.labeled.shape == (8, SIZE, SIZE, 3) and first.labeled.dtype == np.uint8
    assert first.labels.dtype == np.int64 and Counter(first.labels.tolist()) == {0: 4, 1: 4}
    # the label is the class the image came from
    assert [c for c, _ in identity(first.labeled)] == first.labels.tolist()
    # 8 over 3 classes: shares of 3, 3, 2 (remainder to seeded classes); 6 over 3 and 2 classes: exact
    assert sorted(Counter(second.labels.tolist()).values()) == [2, 3, 3]
    assert Counter(c for c, _ in identity(first.unlabeled)) == {0: 2, 1: 2, 4: 2}
    assert Counter(c for c, _ in identity(second.unlabeled)) == {2: 3, 5: 3}


def test_no_reuse_while_unused_images_remain(folder):
    stream = list(build_stream(parse_scenario(TABLE), folder, seed=3))
    drawn = {0: [], 1: []}  # in stream order, labeled before unlabeled
    for e in stream:
        for images in (e.labeled, e.unlabeled):
            for c, k in sorted(identity(images)):
                if c in drawn:
                    drawn[c].append(k)
    # class 0: 4 + 2 per experience in 3 experiences = 18 > 12 images: the first 12 draws are all distinct
    assert len(drawn[0]) == 18
    for c in (0, 1):
        first_round = drawn[c][:TRAIN_PER_CLASS]
        assert len(set(first_round)) == TRAIN_PER_CLASS


def test_first_pass_is_distinct_in_draw_order(folder):
    """Checked on the pool itself: every image of a class comes once before any comes twice."""
    from cl_agent.scenario import ClassPools

    pools = ClassPools(folder.split("train"), np.random.default_rng(0))
    order = np.concatenate([pools.draw_indices(0, 5) for _ in range(5)])  # 25 draws of 12 images
    assert sorted(order[:12].tolist()) == list(range(12))
    assert sorted(order[12:24].tolist()) == list(range(12))
    assert pools.reshuffles[0] == 2


def test_seeded(folder):
    table = parse_scenario(TABLE)
    a = [identity(e.labeled) + identity(e.unlabeled) for e in build_stream(table, folder, seed=1)]
    b = [identity(e.labeled) + identity(e.unlabeled) for e in build_stream(table, folder, seed=1)]
    c = [identity(e.labeled) + identity(e.unlabeled) for e in build_stream(table, folder, seed=2)]
    assert a == b and a != c


def test_limit_is_a_prefix(folder):
    table = parse_scenario(TABLE)
    full = [identity(e.labeled) for e in build_stream(table, folder, seed=0)]
    short = [identity(e.labeled) for e in build_stream(table, folder, seed=0, limit=2)]
    assert short == full[:2]


def test_val_set_is_learnable_classes_only(folder):
    X, y = val_set(parse_scenario(TABLE), folder)
    assert X.shape == (4 * VAL_PER_CLASS, SIZE, SIZE, 3)
    assert Counter(y.tolist()) == {c: VAL_PER_CLASS for c in range(4)}
    assert [c for c, _ in identity(X)] == y.tolist()
    X2, y2 = val_set(parse_scenario(TABLE), folder, per_class=2)
    assert len(y2) == 8


def test_resize_to_profile_size(tmp_path):
    folder = ImageFolder(make_folder(tmp_path / "data", as_tar=True), image_size=4)
    e = next(build_stream(parse_scenario(TABLE), folder, seed=0))
    assert e.labeled.shape == (8, 4, 4, 3)


def test_each_image_decoded_once(folder, monkeypatch):
    import cl_agent.scenario as scenario

    calls = Counter()
    real = scenario.decode_image
    monkeypatch.setattr(scenario, "decode_image", lambda data, size, what: calls.update([what]) or real(data, size, what))
    list(build_stream(parse_scenario(TABLE), folder, seed=0))
    val_set(parse_scenario(TABLE), folder)
    val_set(parse_scenario(TABLE), folder)
    assert calls and max(calls.values()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labeled_per_experience": 0}, "labeled_per_experience"),
        ({"learnable_classes": 9}, "exceeds num_classes"),
        ({"experiences": []}, "non-empty list"),
        ({"experiences": [{"labeled_classes": [0, 5], "unlabeled_classes": []}]}, "class id 5"),
        ({"experiences": [{"labeled_classes": [1, 1], "unlabeled_classes": [1]}]}, "repeated"),
        ({"experiences": [{"labeled_classes": [1]}]}, "expected keys"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_bad_tables_are_rejected_clearly(change, message):
    with pytest.raises(ScenarioError, match=message):
        parse_scenario({**TABLE, **change}, "bad.json")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ScenarioError, match="x.json: not valid JSON"):
        load_scenario(tmp_path / "x.json")
    with pytest.raises(ScenarioError, match="neither train/ nor train.tar"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "classes.tsv").write_text("index\twnid\trole\tname\n0\tn0\tlearnable\tx\n")
        ImageFolder(tmp_path / "empty", 8).split("train")


def test_table_needing_more_classes_than_folder(tmp_path):
    folder = ImageFolder(make_folder(tmp_path / "data"), SIZE)
    table = parse_scenario({**TABLE, "num_classes": 10})
    with pytest.raises(ScenarioError, match="only 6"):
        next(build_stream(table, folder, seed=0))


@pytest.mark.parametrize("number", [1, 2, 3])
def test_shared_scenarios(shared_dir, number):
    table = load_scenario(scenario_path(shared_dir / "scenarios", number))
    assert len(table.experiences) == 50 and table.learnable_classes == 100
    assert table.labeled_per_experience == 500 and table.unlabeled_per_experience == 1000
    labeled = {c for e in table.experiences for c in e.labeled_classes}
    unlabeled = {c for e in table.experiences for c in e.unlabeled_classes}
    assert labeled == set(range(100))
    assert (max(unlabeled) >= 100) == (number == 3)  # distractors only in scenario 3
    if number == 1:
        assert all(e.labeled_classes == e.unlabeled_classes for e in table.experiences)


def test_shared_dataset_stream(shared_dir):
    table = load_scenario(scenario_path(shared_dir / "scenarios", 3))
    folder = ImageFolder(shared_dir / "datasets" / "tiny-imagenet-130", image_size=16)
    e = next(build_stream(table, folder, seed=0, limit=1))
    assert e.labeled.shape == (500, 16, 16, 3) and e.unlabeled.shape == (1000, 16, 16, 3)
    assert set(e.labels.tolist()) == set(table.experiences[0].labeled_classes)
    X, y = val_set(table, folder, per_class=2)
    assert X.shape == (200, 16, 16, 3) and sorted(set(y.tolist())) == list(range(100))
