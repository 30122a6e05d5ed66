import pytest

pytestmark = pytest.mark.integration


def test_cluster_runs_a_dataset(ray_session):
    import ray

    ds = ray.data.range(100).map_batches(lambda b: {"id": b["id"] * 2})
    assert sum(r["id"] for r in ds.take_all()) == 2 * sum(range(100))
