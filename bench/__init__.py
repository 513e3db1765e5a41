"""Benchmark scripts: run them as modules from the repository root, e.g.
`python -m bench.bench_grpo` or `bash bench/gpu_suite.sh` (see docs/benchmarks.md).

`bench.common` holds what they share: the settings of a benchmark run and their one mapping
to `TrainConfig`, random-weight models of the shipped architectures, prompts, the reward, the
docs writer and the subprocess-with-a-deadline helper.
"""
