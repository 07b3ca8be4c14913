"""pytest-benchmark suites built from the fastlm.bench case registry.

    pytest benchmarks/ [--fastlm-device cpu|cuda] [--fastlm-quick]

A benchmark module names its op (``OP = "layer_norm"``) and defines one test taking the
``bench_point`` and ``benchmark`` fixtures that calls ``bench_point.run(benchmark)``. This file
parametrizes that test over the op's shapes, directions and implementations for the device;
implementations that cannot run here are skipped with the reason.
"""

from dataclasses import dataclass

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("fastlm")
    group.addoption("--fastlm-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark (default: cuda when a GPU is visible, else cpu)")
    group.addoption("--fastlm-quick", action="store_true", help="the quick shape list only")


@dataclass(frozen=True)
class BenchPoint:
    """One implementation of one case at one shape and direction."""

    case: object
    shape: dict
    direction: str
    impl: object
    device: str

    def run(self, benchmark):
        """Check the implementation against the oracle, then time it with `benchmark`."""
        from fastlm.bench.runner import max_abs_errors, no_donated_buffers

        with no_donated_buffers():
            self._run(benchmark, max_abs_errors)

    def _run(self, benchmark, max_abs_errors):
        inputs = self.case.make_inputs(self.shape, torch.device(self.device))
        fn = self.impl.prepare(inputs, self.direction)
        expected = self.case.expected(inputs, self.direction)
        errors = max_abs_errors(fn(), expected, self.case.outputs_of(self.direction))
        del expected
        if self.device == "cuda":
            def step():
                fn()
                torch.cuda.synchronize()

            benchmark.pedantic(step, rounds=50, warmup_rounds=5, iterations=1)
        else:
            benchmark(fn)
        benchmark.extra_info.update(
            shape=self.shape, direction=self.direction,
            max_err=None if self.impl.error_na else max(errors.values()),
            error_na=self.impl.error_na)
        if self.case.bytes and benchmark.stats is not None:  # (None: --benchmark-disable)
            nbytes = self.case.bytes_of(self.shape, self.direction)
            benchmark.extra_info.update(
                bytes=nbytes, gbps=nbytes / benchmark.stats.stats.median / 1e9)


def pytest_generate_tests(metafunc):
    if "bench_point" not in metafunc.fixturenames:
        return
    from fastlm import bench
    from fastlm.bench import runner

    config = metafunc.config
    device = config.getoption("--fastlm-device") or (
        "cuda" if torch.cuda.is_available() else "cpu")
    case = bench.get(metafunc.module.OP)
    quick = config.getoption("--fastlm-quick")
    params = []
    for shape in case.shape_list(device, quick):
        for direction in runner.directions(case, "quick" if quick else "full"):
            for impl in case.impls:
                ok, why = bench.registry.availability(impl, device)
                if ok and quick and device not in impl.quick_devices:
                    ok, why = False, f"not in --fastlm-quick on {device}"  # as `fastlm bench`
                label = bench.shape_label(shape).replace(" ", "-")
                params.append(pytest.param(
                    BenchPoint(case, shape, direction, impl, device),
                    id=f"{direction}-{label}-{impl.name}",
                    marks=() if ok else pytest.mark.skip(reason=f"{impl.name}: {why}")))
    metafunc.parametrize("bench_point", params)
