"""The examples in the docstrings of the pure modules run and say what they show.

(Examples that need a running cluster are marked ``+SKIP`` there and exercised for real by
the other tests.)
"""

import doctest
import importlib

import pytest

PURE_MODULES = ["nbtool.errors", "nbtool.wire", "nbtool.warn", "nbtool.devices", "nbtool.registry", "nbtool.model_files", "nbtool.sources", "nbtool.inputs", "nbtool.store", "nbtool.store_lock", "nbtool.metrics", "nbtool.magic_args", "nbtool.quiet", "nbtool.progress", "nbtool.samples", "nbtool.gpu_monitor", "nbtool.svg", "nbtool.report", "nbtool.preprocess",
                "nbtool.results", "nbtool.tables", "nbtool.output_cache",
                "nbtool.worker", "nbtool.worker.reading", "nbtool.worker.batching",
                "nbtool.worker.litert", "nbtool.worker.measure", "nbtool.worker.runtime",
                "nbtool.worker.loading", "nbtool.worker.predictors", "nbtool.worker.cache",
                "nbtool.worker.process", "nbtool.worker.convert", "nbtool.worker.tasks",
                "nbtool.worker.openvino", "nbtool.worker.fixed_batch", "nbtool.worker.agreement",
                "nbtool.worker.to_litert", "nbtool.worker.records", "nbtool.worker.candidates",
                "nbtool.worker.choice", "nbtool.worker.guard", "nbtool.worker.opening", "nbtool.worker.backends", "nbtool.worker.backend_predictors", "nbtool.keras_backend",
                "nbtool.worker.ov_files", "nbtool.worker.ov_variants", "nbtool.ir_files",
                "nbtool.planning", "nbtool.placement", "nbtool.settings", "nbtool.session", "nbtool.catalog",
                "nbtool.loads", "nbtool.runs", "nbtool.private_files", "nbtool.engine_files", "nbtool.facade",
                "nbtool.persist_server", "nbtool.on_scheduler", "nbtool.current", "nbtool.run_assembly", "nbtool.persistent",
                "nbtool.attached"]


@pytest.mark.parametrize("name", PURE_MODULES)
def test_docstring_examples_run(name, monkeypatch, tmp_path):
    monkeypatch.delenv("NBTOOL_FAKE_GPUS", raising=False)
    monkeypatch.setenv("NBTOOL_RUNTIME_DIR", str(tmp_path / "runtime"))   # engine files
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no runnable examples"
    assert result.failed == 0
