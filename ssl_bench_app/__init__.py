"""The application layer of ssl-bench: the ``ssl-bench`` command line (cli, commands/), launching on SLURM
(launch/), sweeps and the benchmark. It drives the core library (``ssl_bench``), the methods and ``evals``;
nothing in ``ssl_bench`` imports it."""
