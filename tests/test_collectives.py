"""ds_cl.core.collectives: tensors on the accelerator's device, or a clear refusal (one process here; every
multi-rank test of the trainer and the projector runs its collectives through it)."""

import pytest
import torch

from ds_cl.core import collectives


def test_device_is_the_accelerators():
    from deepspeed.accelerator import get_accelerator

    assert collectives.device() == torch.device(get_accelerator().current_device_name())


def test_a_tensor_elsewhere_is_refused_before_any_communication():
    with pytest.raises(RuntimeError, match="accelerator's device"):
        collectives.all_reduce_(torch.zeros(2, device="meta"))
    with pytest.raises(RuntimeError, match="accelerator's device"):
        collectives.all_to_all_single(torch.zeros(1), torch.zeros(1, device="meta"), [1], [1])


def test_without_a_process_group_they_return_their_input():
    assert collectives.all_reduce_values([1.5, 2]) == [1.5, 2.0]
    # A one-element tensor joins as it is (a step's loss sum, never read back before the reduction).
    assert collectives.all_reduce_values([torch.tensor(0.1, dtype=torch.float64) / 3, 7, True]) == [0.1 / 3, 7.0, 1.0]
    assert collectives.any_rank(True) and not collectives.any_rank(False)
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    assert collectives.gather_object(3) == [3]
    collectives.barrier()
