"""The ledger consumer's collector setting: fewer young-generation passes, the older generations' ratios kept."""

import gc

from ledger.runtime import BATCH_GEN0_THRESHOLD, tune_gc_for_batches


def test_tune_gc_for_batches_raises_only_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc_for_batches()
        assert gc.get_threshold() == (BATCH_GEN0_THRESHOLD, 10, 10)
        assert BATCH_GEN0_THRESHOLD > 700
    finally:
        gc.set_threshold(*before)
