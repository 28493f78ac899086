import numpy as np

from cl_agent.synthetic import CLASS_NAMES, make_batch, schedule


def test_images_are_deterministic_rgb_uint8():
    a = make_batch([0, 1, 2], np.random.default_rng(3), size=32)
    b = make_batch([0, 1, 2], np.random.default_rng(3), size=32)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_schedule_introduces_every_class_and_repeats_some():
    plan = schedule(8, classes_per_experience=3, seed=0)
    assert len(plan) == 8
    seen = set()
    repeated = 0
    for classes in plan:
        repeated += len(seen & set(classes))
        seen |= set(classes)
    assert seen == set(range(len(CLASS_NAMES)))
    assert repeated > 0
