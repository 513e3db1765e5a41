"""Shared test setup.

- One thread for torch: on small CPU machines, handing the tiny models' small matrices
  between threads costs far more than the arithmetic (seen: 16 ms instead of 30 us per matmul).
- One built-in tiny model for the whole session, in a temporary cache that subprocesses
  (CLI tests) find through LOWVRAM_GRPO_CACHE.
"""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lowvram_grpo_cache")
    previous = os.environ.get("LOWVRAM_GRPO_CACHE")
    os.environ["LOWVRAM_GRPO_CACHE"] = str(cache)
    from lowvram_grpo.tiny import tiny_model_path

    tiny_model_path()  # build once, before any test or subprocess needs it
    yield cache
    if previous is None:
        os.environ.pop("LOWVRAM_GRPO_CACHE", None)
    else:
        os.environ["LOWVRAM_GRPO_CACHE"] = previous


@pytest.fixture
def tiny_path(tiny_cache):
    from lowvram_grpo.tiny import tiny_model_path

    return tiny_model_path()
