"""The node's shared rate-limit counters, compiled and pure (fastgate/_core/_pure/limiter.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from tests.unit.core.conftest import load_core_module

SECOND = 1000
MINUTE = 60_000


@pytest.fixture
def limiter(core_module):
    return core_module("limiter")


def segment(limiter, slots=64):
    fd = os.memfd_create("fastgate-test-counters")
    limiter.initialise(fd, slots)
    return fd


@pytest.fixture
def counters(limiter):
    fd = segment(limiter)
    shared = limiter.SharedCounters(fd, 64)
    yield shared
    shared.close()
    os.close(fd)


def test_fixed_windows_admit_the_limit_and_count_only_allowed_requests(counters):
    keys, starts, windows = (b"k|second", b"k|minute"), (5 * SECOND, 0), (SECOND, MINUTE)
    results = [counters.take_fixed(keys, starts, windows, (3, 5)) for _ in range(5)]
    assert results == [(-1, [0, 0]), (-1, [1, 1]), (-1, [2, 2]), (0, [3, 3]), (0, [3, 3])]
    # The next second: the second-window starts again, the minute keeps the 3 allowed ones.
    assert counters.take_fixed(keys, (6 * SECOND, 0), windows, (3, 5)) == (-1, [0, 3])
    assert counters.take_fixed(keys, (6 * SECOND, 0), windows, (3, 5)) == (-1, [1, 4])
    assert counters.take_fixed(keys, (6 * SECOND, 0), windows, (3, 5)) == (1, [2, 5])


def test_sliding_window_weights_the_previous_window(counters):
    key = (b"s",)
    for _ in range(10):
        counters.take_sliding(key, (0,), (MINUTE,), (100,), (0.0,), True)
    # Half-way through the next window: rate = current + 10 * 0.5.
    assert counters.take_sliding(key, (MINUTE,), (MINUTE,), (100,), (0.5,), True) == (-1, [6.0])
    assert counters.take_sliding(key, (MINUTE,), (MINUTE,), (6.5,), (0.5,), True) == (0, [7.0])
    # Denied with penalty: counted (2 now); two windows later the previous is not adjacent: 0.
    assert counters.take_sliding(key, (3 * MINUTE,), (MINUTE,), (100,), (0.9,), True) == (-1, [1.0])


def test_sliding_without_penalty_gives_the_denied_count_back(counters):
    key = (b"p",)
    assert [counters.take_sliding(key, (0,), (MINUTE,), (2,), (0.0,), False)[0] for _ in range(4)] == [-1, -1, 0, 0]
    # The denied ones were taken back: the count is still 2.
    assert counters.take_sliding(key, (0,), (MINUTE,), (100,), (0.0,), False) == (-1, [3.0])


def test_windows_after_the_denying_one_are_only_read(counters):
    keys, windows = (b"a|1", b"a|60"), (SECOND, MINUTE)
    assert counters.take_sliding(keys, (0, 0), windows, (1, 10), (0.0, 0.0), True) == (-1, [1.0, 1.0])
    assert counters.take_sliding(keys, (0, 0), windows, (1, 10), (0.0, 0.0), True) == (0, [2.0, 1.0])


def test_a_worker_a_hair_behind_counts_in_the_newer_window(counters):
    key, window = (b"late",), (SECOND,)
    counters.take_fixed(key, (2 * SECOND,), window, (10,))
    # Another worker read the clock just before the boundary: it must not wipe the new window.
    assert counters.take_fixed(key, (SECOND,), window, (10,)) == (-1, [1])
    assert counters.take_fixed(key, (2 * SECOND,), window, (10,)) == (-1, [2])


def test_the_segment_is_bounded_and_reuses_expired_slots(limiter):
    fd = segment(limiter, slots=4)
    counters = limiter.SharedCounters(fd, 4)
    try:
        for name in range(4):
            counters.take_fixed((b"key-%d" % name,), (0,), (SECOND,), (10,))
        # Full of live keys: a fifth takes over the slot that expires first and starts at 0;
        # two windows later every old slot has expired and is reused.
        assert counters.take_fixed((b"key-4",), (0,), (SECOND,), (10,)) == (-1, [0])
        assert counters.take_fixed((b"key-5",), (2 * SECOND,), (SECOND,), (10,)) == (-1, [0])
        assert counters.take_fixed((b"key-5",), (2 * SECOND,), (SECOND,), (10,)) == (-1, [1])
    finally:
        counters.close()
        os.close(fd)


def test_refuses_a_segment_it_did_not_initialise(limiter):
    fd = os.memfd_create("fastgate-test-blank")
    os.ftruncate(fd, limiter.segment_bytes(8))
    try:
        with pytest.raises(ValueError, match="not a counter segment"):
            limiter.SharedCounters(fd, 8)
        limiter.initialise(fd, 8)
        with pytest.raises(ValueError, match="not a counter segment"):
            limiter.SharedCounters(fd, 16)
        with pytest.raises(ValueError, match="windows per check"):
            limiter.SharedCounters(fd, 8).take_fixed((b"k",) * 17, (0,) * 17, (1,) * 17, (1,) * 17)
    finally:
        os.close(fd)


def _hammer(implementation, fd, slots, start_at, attempts, results):
    counters = load_core_module("limiter", implementation).SharedCounters(fd, slots)
    while time.monotonic() < start_at:
        pass
    allowed = 0
    for _ in range(attempts):
        if counters.take_fixed((b"shared",), (0,), (MINUTE,), (250,))[0] < 0:
            allowed += 1
    results.put(allowed)


@pytest.mark.parametrize("implementation", ["compiled", "pure"])
def test_exactly_the_limit_passes_across_processes(implementation):
    # Four processes race 200 checks each against one limit of 250 in one segment.
    limiter = load_core_module("limiter", implementation)
    fd = segment(limiter)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start_at = time.monotonic() + 0.5
    workers = [context.Process(target=_hammer, args=(implementation, fd, 64, start_at, 200, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    counts = [results.get(timeout=5) for _ in workers]
    os.close(fd)
    assert sum(counts) == 250, counts


def test_a_lock_left_by_a_dead_process_is_taken_over():
    limiter = load_core_module("limiter", "compiled")
    fd = segment(limiter)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=os.kill, args=(os.getpid(), 0))
    child.start()
    child.join()
    # Forge the header's lock word as held by the child that has exited.
    import mmap
    import struct

    with mmap.mmap(fd, limiter.segment_bytes(64)) as memory:
        struct.pack_into("=I", memory, 16, child.pid)
    counters = limiter.SharedCounters(fd, 64)
    began = time.monotonic()
    assert counters.take_fixed((b"k",), (0,), (SECOND,), (5,)) == (-1, [0])
    assert time.monotonic() - began < 2.0  # taken over after ~10 ms of spinning, not stuck
    counters.close()
    os.close(fd)


def test_hit_is_take_sliding_for_one_window(limiter):
    fd = segment(limiter)
    one, many = limiter.SharedCounters(fd, 64), limiter.SharedCounters(fd, 64)
    try:
        for penalty in (True, False):
            key = b"one-%d" % penalty
            other = b"many-%d" % penalty
            for start, weight in ((0, 0.0), (0, 0.0), (0, 0.0), (MINUTE, 0.25), (MINUTE, 0.25)):
                rate = one.hit(key, start, MINUTE, 2.5, weight, penalty)
                denied, rates = many.take_sliding((other,), (start,), (MINUTE,), (2.5,), (weight,), penalty)
                assert (0 if rate > 2.5 else -1, [rate]) == (denied, rates)
    finally:
        one.close()
        many.close()
        os.close(fd)


def test_decimal(counters):
    assert [counters.decimal(value) for value in (0, 7, 42, -3, 10**18, -(2**63))] == [
        b"0", b"7", b"42", b"-3", b"1000000000000000000", b"-9223372036854775808"]
