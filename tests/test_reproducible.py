"""Fixture and demo training give the same bits on every run, whatever the thread count."""

import torch

from dsreg.demo import finetune, make_base, state_dict


def _train(threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = make_base(32, steps=4)
        return state_dict(finetune(base, subject=2, steps=4))
    finally:
        torch.set_num_threads(before)


def test_training_is_bit_identical_with_one_or_two_threads():
    one, two = _train(1), _train(2)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_training_leaves_the_thread_count_and_determinism_as_they_were():
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    _train(threads)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
