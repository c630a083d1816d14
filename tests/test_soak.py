"""A scaled-down soak (benchmarks/soak.py): 300 requests in waves of random concurrency with
random sampling and 20% client aborts; every request ends with a reason, every KV block is
free afterwards and memory does not grow."""

from __future__ import annotations

from tests.scripts import load_script

run = load_script("benchmarks/soak.py").run


def test_soak_accounts_for_every_request_and_block(engines):
    report = run(engines("llama"), requests=300, max_concurrency=24, abort_fraction=0.2,
                 seed=1, max_rss_growth_mb=48, kv_cache_memory=1 << 20, block_size=4)
    assert report["ok"], report["problems"]
    finishes = report["finishes"]
    assert sum(finishes.values()) == 300
    assert finishes.get("aborted-by-client", 0) > 20 and finishes.get("length", 0) > 100
