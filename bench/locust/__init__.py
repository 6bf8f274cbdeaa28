"""Locust scenarios for dorm, driven by `python -m bench.locust_run SCENARIO [--quick]`.

Each locustfile reads its parameters from the JSON file named by `$DORM_LOCUST_CONFIG` (written by
the driver), so a locust run is reproducible from that file alone, and records one raw line per
request to `$DORM_LOCUST_CONFIG`'s `samples` path: Locust's CSV keeps only rounded percentiles per
name, and the plots and the cold/warm split need every sample.
"""
