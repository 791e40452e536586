"""Actor sizing: a cluster that cannot host the scan now is asked anyway when it can grow, never otherwise."""

import pytest

from decree_ray.config import JobError
from decree_ray.pool import plan_actors
from decree_ray.progress import Counts, RichReporter


def test_a_scale_to_zero_cluster_is_asked_for_every_worker_it_does_not_have_yet():
    shape = plan_actors({"CPU": 0}, cpus=1, gpus=1, workers=16, max_encoders=None, can_grow=True)
    assert (shape.count, shape.gpus, shape.fits_now) == (16, 1, 0)
    assert shape.asked == "16 actors of 1 CPU, 1 GPU"


def test_a_cluster_that_cannot_grow_fails_at_once_naming_ask_and_offer():
    with pytest.raises(JobError, match=r"--gpus-per-encoder 1 but the cluster has 8 CPUs, 0 GPUs and no autoscaler"):
        plan_actors({"CPU": 8}, cpus=1, gpus=1, workers=2, max_encoders=None, can_grow=False)


def test_without_a_worker_count_the_pool_fills_what_is_there_and_caps_at_the_encoders():
    assert plan_actors({"CPU": 16, "GPU": 4}, cpus=2, gpus=None, workers=None, max_encoders=None,
                       can_grow=False).count == 4
    assert plan_actors({"CPU": 16}, cpus=2, gpus=None, workers=None, max_encoders=3, can_grow=False).count == 3
    assert plan_actors({"CPU": 0}, cpus=1, gpus=1, workers=None, max_encoders=None, can_grow=True).count == 1


def test_progress_says_it_waits_for_workers_before_the_first_is_ready():
    reporter = RichReporter()
    reporter.update(Counts(discovered=5, workers=16, workers_ready=0))
    task = reporter._progress.tasks[0]
    assert task.description == "waiting for workers: 0/16 ready, autoscaler adding nodes"
    reporter.update(Counts(discovered=5, workers=16, workers_ready=16))
    assert reporter._progress.tasks[0].description == "scanning"


def test_a_starting_actor_warms_one_architecture_per_family_and_a_bounded_number_of_them():
    from decree_ray.slots import one_per_family
    from decree_ray.worker import WARM_ARCHS

    archs = ()
    for arch in ["timm/a", "timm/b", None, "", "open_clip/ViT-B-32", "timm/c"]:
        archs = one_per_family(archs, arch)
    assert archs == ("timm/a", "open_clip/ViT-B-32")
    for i in range(100):  # a hostile manifest naming many families cannot grow what each actor is sent
        archs = one_per_family(archs, f"fam{i}/x")
    assert len(archs) == WARM_ARCHS
