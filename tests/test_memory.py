"""PeakMemory (hpcsoup/memory.py): what every stage records beside its seconds."""
import time

import torch

from hpcsoup.memory import PeakMemory


def test_peak_rss_sees_a_block_allocation_and_no_gpu_figure_on_a_cpu():
    with PeakMemory(device="cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block.add_(1)
        # held until the sampler (a thread every 5 ms) has run once: on a loaded machine it may
        # not be scheduled during the few ms the allocation lives (seen in CI at load 4)
        deadline = time.monotonic() + 5.0
        while memory.peak - memory.start < 48 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.005)
        del block
    assert memory.above_start >= 48 * 2**20, memory.above_start
    assert memory.peak >= memory.start > 0
    assert memory.gpu_peak is None
    # the buffer is anonymous memory (no file behind it): it counts there too, within the RSS
    assert 48 * 2**20 <= memory.anon_above_start <= memory.above_start + 2**20


def test_file_backed_pages_count_in_rss_but_not_as_anonymous_memory(tmp_path):
    import mmap

    path = tmp_path / "pages"
    path.write_bytes(b"\1" * (32 * 2**20))
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        with PeakMemory() as memory:
            total = sum(view[i] for i in range(0, len(view), 4096))  # page every page in
    assert total == 32 * 2**20 // 4096
    assert memory.above_start >= 24 * 2**20, memory.above_start
    assert memory.anon_above_start < 8 * 2**20, memory.anon_above_start


def test_available_memory_is_positive_and_below_the_machines():
    from pathlib import Path

    from hpcsoup.memory import available_bytes

    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < available_bytes() <= total


def test_free_heap_pages_go_back_to_the_system():
    """glibc keeps freed buffers below its mmap threshold in the heap (RSS stays up); a rank's
    scoring loop hands them back between fields (``release_free_memory``)."""
    from hpcsoup.memory import _rss_bytes, release_free_memory

    blocks = [torch.ones(100 * 1024 // 4) for _ in range(1024)]  # 100 MiB in the heap
    pin = torch.ones(100 * 1024 // 4)  # above them: freeing them leaves a hole, not a free top
    del blocks
    kept = _rss_bytes()
    release_free_memory()
    assert _rss_bytes() < kept - 50 * 2**20, (kept, _rss_bytes())
    del pin
