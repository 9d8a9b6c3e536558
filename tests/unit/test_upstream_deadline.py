"""ReadWatchdog: one timer per stream; fires only inside a read; never eats a real cancel."""

from __future__ import annotations

import asyncio

import pytest

from worker.upstream.deadline import ReadTimeout, ReadWatchdog


async def test_read_in_time_returns_value() -> None:
    watchdog = ReadWatchdog()
    loop = asyncio.get_running_loop()
    for i in range(50):
        assert await watchdog.read(asyncio.sleep(0, result=i), loop.time() + 5) == i
    watchdog.close()


async def test_read_past_deadline_raises_and_task_is_not_left_cancelled() -> None:
    watchdog = ReadWatchdog()
    loop = asyncio.get_running_loop()
    with pytest.raises(ReadTimeout):
        await watchdog.read(asyncio.sleep(10), loop.time() + 0.05)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # the task still runs normally afterwards
    watchdog.close()


async def test_deadline_already_passed() -> None:
    watchdog = ReadWatchdog()
    with pytest.raises(ReadTimeout):
        await watchdog.read(asyncio.sleep(0), asyncio.get_running_loop().time() - 1)
    watchdog.close()


async def test_slow_consumer_between_reads_is_not_cancelled() -> None:
    """The deadline is only enforced while reading: time spent outside is not ours."""
    watchdog = ReadWatchdog()
    loop = asyncio.get_running_loop()
    await watchdog.read(asyncio.sleep(0), loop.time() + 0.05)
    await asyncio.sleep(0.15)  # the consumer is busy well past the old deadline
    assert await watchdog.read(asyncio.sleep(0, result="ok"), loop.time() + 1) == "ok"
    watchdog.close()


async def test_moving_deadline_rearms_once() -> None:
    watchdog = ReadWatchdog()
    loop = asyncio.get_running_loop()
    await watchdog.read(asyncio.sleep(0), loop.time() + 0.05)
    # A later deadline while the earlier timer is pending: it must not fire early.
    assert await watchdog.read(asyncio.sleep(0.1, result=1), loop.time() + 1) == 1
    watchdog.close()


async def test_outside_cancellation_propagates() -> None:
    async def reader() -> None:
        watchdog = ReadWatchdog()
        try:
            await watchdog.read(asyncio.sleep(10), asyncio.get_running_loop().time() + 5)
        finally:
            watchdog.close()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_arm_api_timeout_and_real_cancel() -> None:
    watchdog = ReadWatchdog()
    loop = asyncio.get_running_loop()
    caught = False
    try:
        watchdog.arm(loop.time() + 0.05)
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        caught = watchdog.timed_out()
    finally:
        watchdog.disarm()
    assert caught
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    with pytest.raises(ReadTimeout):
        watchdog.arm(loop.time() - 1)
    watchdog.disarm()
    watchdog.close()
