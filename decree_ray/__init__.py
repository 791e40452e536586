"""decree_ray: the scale layer of decree-ray (Ray job, S3/folder/manifest sources, Parquet results, CLI).

The core (`decree`) stays plain PyTorch; everything about clusters, object stores and tables lives here.
"""

__all__ = ["JobConfig", "JobSummary", "run_job"]


def __getattr__(name):  # Ray is heavy to import: load the job module only when it is used
    if name in __all__:
        from . import job

        return getattr(job, name)
    raise AttributeError(name)
