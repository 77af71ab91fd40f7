"""The asyncio bridge: one loop per process in a real thread, greenlets waiting cooperatively."""

from __future__ import annotations

import asyncio
import os
import threading

import gevent
import locust  # noqa: F401  (monkey-patches like a Locust process does)
import pytest

from loadkit.generate import bridge


def test_many_greenlets_share_one_loop_in_another_os_thread() -> None:
    native_ids: set[int] = set()

    async def work(i: int) -> int:
        native_ids.add(threading.get_native_id())
        await asyncio.sleep(0.05)
        return i * 2

    greenlets = [gevent.spawn(bridge.run, work(i)) for i in range(200)]
    gevent.joinall(greenlets, timeout=30)
    assert [g.value for g in greenlets] == [i * 2 for i in range(200)]
    assert len(native_ids) == 1
    assert threading.get_native_id() not in native_ids


def test_greenlets_keep_running_while_one_waits() -> None:
    ticks = []

    def ticker() -> None:
        for _ in range(5):
            ticks.append(1)
            gevent.sleep(0.01)

    async def until_ticked() -> int:
        # waits for the ticks rather than a fixed 0.2 s a loaded machine can outlast: were the
        # greenlets blocked while bridge.run waits, they would never come and this returns < 5
        deadline = asyncio.get_running_loop().time() + 10
        while len(ticks) < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return len(ticks)

    g = gevent.spawn(ticker)
    assert bridge.run(until_ticked(), timeout=30) == 5
    g.join()


def test_exception_of_the_coroutine_is_raised_in_the_greenlet() -> None:
    async def boom() -> None:
        raise ValueError("from the loop")

    with pytest.raises(ValueError, match="from the loop"):
        bridge.run(boom())


def test_killing_the_waiting_greenlet_cancels_the_task_on_the_loop() -> None:
    state = {}

    async def long() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    g = gevent.spawn(bridge.run, long())
    gevent.sleep(0.1)
    g.kill(block=True, timeout=5)
    assert g.dead
    for _ in range(100):
        if state.get("cancelled"):
            break
        gevent.sleep(0.01)
    assert state == {"cancelled": True}


def test_timeout_cancels_too() -> None:
    with pytest.raises(gevent.Timeout):
        bridge.run(asyncio.sleep(30), timeout=0.1)


def test_name_lookups_use_real_threads_and_complete() -> None:
    async def lookup() -> list:
        return await asyncio.get_running_loop().getaddrinfo("localhost", 143)

    # a patched executor would hang here; the bridge's timeout turns a hang into a failure
    infos = bridge.run(lookup(), timeout=20)
    assert any(info[4][0] in ("127.0.0.1", "::1") for info in infos)


def test_signal_set_from_the_loop_wakes_a_greenlet() -> None:
    sig = bridge.Signal()

    async def later() -> None:
        await asyncio.sleep(0.05)
        sig.set_threadsafe()

    bridge.get_bridge().spawn(later())
    assert sig.wait(10) is True
    assert bridge.Signal().wait(0.01) is False


def test_a_forked_child_gets_its_own_loop() -> None:
    parent = bridge.get_bridge()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not use the parent's (absent) loop thread
        try:
            async def answer() -> int:
                return 42

            ok = bridge.run(answer(), timeout=10) == 42 and bridge.get_bridge() is not parent
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    os.close(r)
    assert status == 0


def test_shutdown_cancels_pending_work_and_a_new_bridge_starts_after() -> None:
    b = bridge.get_bridge()
    state = {"cancelled": 0}

    async def pending() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] += 1
            raise

    for _ in range(20):
        b.spawn(pending())
    gevent.sleep(0.1)
    b.shutdown(timeout_s=5)
    assert state["cancelled"] == 20
    with pytest.raises(bridge.BridgeClosed):
        b.run(asyncio.sleep(0))
    assert bridge.run(asyncio.sleep(0, result="again"), timeout=10) == "again"
