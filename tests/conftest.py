import pytest
import torch

# Tiny recurrent models run fastest single-threaded; it also keeps tests stable on 2-core CI.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_task():
    from lrnn_analysis.builtin_tasks import load_task

    return load_task("digits", seed=0)
