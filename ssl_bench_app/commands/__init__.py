"""Sub-commands of ``ssl-bench``; every module here is picked up by ``ssl_bench_app.cli``."""
