"""A task's split in batches."""
import torch


def test_split_batches_are_consecutive_and_counted(digits_task):
    split = digits_task.test
    all_batches = split.batches(100)
    assert [len(x) for x, _ in all_batches] == [100, 100, 100, len(split) - 300]
    assert torch.equal(torch.cat([x for x, _ in all_batches]), split.x)
    assert len(split.batches(100, count=2)) == 2 and split.batches(100, count=2)[1][1].shape == (100,)
