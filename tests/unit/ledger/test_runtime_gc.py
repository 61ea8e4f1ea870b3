"""The ledger consumer's collector setting: fewer young-generation passes, the older generations' ratios kept."""

import gc

from ledger.runtime import BATCH_GEN0_THRESHOLD, cyclic_gc_paused, tune_gc_for_batches


def test_tune_gc_for_batches_raises_only_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc_for_batches()
        assert gc.get_threshold() == (BATCH_GEN0_THRESHOLD, 10, 10)
        assert BATCH_GEN0_THRESHOLD > 700
    finally:
        gc.set_threshold(*before)


def test_cyclic_gc_paused_pauses_the_collector_and_restores_what_was_there() -> None:
    assert gc.isenabled()
    try:
        with cyclic_gc_paused():
            assert not gc.isenabled()
            raise KeyError("a decode that fails")
    except KeyError:
        pass
    assert gc.isenabled()  # restored on the way out of an error too
    gc.disable()
    try:
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
