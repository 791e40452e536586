"""The reliability recorder's fixtures, shared by the fault-suite modules (import them into the module)."""

import functools

import pytest

from faults.recorder import ModuleRecorder


@pytest.fixture(scope="module", autouse=True)  # first in, last out: times the whole module
def rec(request):
    r = ModuleRecorder(request.module.__name__.rpartition(".")[2])
    yield r
    r.close()


@pytest.fixture()
def record(rec, request):
    return functools.partial(rec, test=request.node.originalname)


@pytest.fixture()
def gap(rec, request):
    return functools.partial(rec.gap, test=request.node.originalname)
