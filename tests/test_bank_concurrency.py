"""ReferenceBank.save under concurrency: readers in other processes always load a complete
bank (the old or the new one) while two processes save over it and one of them is killed
with SIGKILL at random moments of its saves."""
import multiprocessing as mp
import os
import random
import signal
import sys
import time
import traceback

import pytest
import torch

from fastad.bank import ReferenceBank

from test_bank import current

ROWS = {"a": 30_000, "b": 20_000}  # a few MiB each: a save takes long enough to be interrupted

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork and flock: the Linux path")


def _bank(name: str) -> ReferenceBank:
    bank = ReferenceBank(16, metric="l2")
    feats = torch.full((ROWS[name], 16), float(ord(name)))  # every row says which bank it is
    bank.add(feats, category=name)
    return bank.build(progress=False)


def _save_forever(path, seed):
    torch.set_num_threads(1)
    banks = [_bank("a"), _bank("b")]
    rng = random.Random(seed)
    while True:
        rng.choice(banks).save(path)


def _load_until(path, deadline, results):
    torch.set_num_threads(1)
    loads, error = 0, None
    while time.monotonic() < deadline:
        try:
            bank = ReferenceBank.load(path)
            (name,) = bank.categories
            feats = bank._cats[name].features
            assert len(bank) == ROWS[name] and bool((feats == float(ord(name))).all()), "mixed or partial bank"
            loads += 1
        except Exception:
            error = traceback.format_exc()
            break
    results.put((loads, error))


def test_readers_see_complete_banks_while_savers_race_and_die(tmp_path):
    path = tmp_path / "bank"
    _bank("a").save(path)
    ctx = mp.get_context("fork")  # the test process has imported everything: children start in ms
    results = ctx.Queue()
    deadline = time.monotonic() + 6.0
    readers = [ctx.Process(target=_load_until, args=(path, deadline, results)) for _ in range(2)]
    steady = ctx.Process(target=_save_forever, args=(path, 1))
    for p in [*readers, steady]:
        p.start()
    kills, rng = 0, random.Random(0)
    try:
        while time.monotonic() < deadline:
            victim = ctx.Process(target=_save_forever, args=(path, 100 + kills))
            victim.start()
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(victim.pid, signal.SIGKILL)
            victim.join()
            kills += 1
        outcomes = [results.get(timeout=60) for _ in readers]
    finally:
        os.kill(steady.pid, signal.SIGKILL)
        steady.join()
        for p in readers:
            p.join(timeout=60)
    for loads, error in outcomes:
        assert error is None, error
        assert loads > 0
    assert kills >= 5 and steady.exitcode == -signal.SIGKILL
    # whatever the kills left, the bank loads, and the next save collects every old version
    assert len(ReferenceBank.load(path)) in ROWS.values()
    _bank("b").save(path)
    assert sorted(os.listdir(path)) == [".lock", "CURRENT", current(path).name]
    assert ReferenceBank.load(path).categories == ["b"]
