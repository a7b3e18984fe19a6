"""peak_rss_mb is the trial's peak, not the lifetime peak of a reused Ray worker process."""

import numpy as np
import pytest

from sweeps.run.trainable import peak_rss_mb, reset_peak_rss


def test_a_new_window_forgets_the_memory_of_what_ran_before():
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    with_big = peak_rss_mb()
    del big
    if not reset_peak_rss():
        pytest.skip("this platform cannot reset the peak RSS (/proc/self/clear_refs)")
    after = peak_rss_mb()
    assert after < with_big - 300, (with_big, after)
    small = np.ones(100 * 2**20 // 8)  # the new window sees what runs in it
    assert peak_rss_mb() >= after + 80
    del small
