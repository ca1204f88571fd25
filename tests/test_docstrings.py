"""The examples in the docstrings of the pure modules run and say what they show.

(Examples that need a running cluster are marked ``+SKIP`` there and exercised for real by
the other tests.)
"""

import doctest
import importlib

import pytest

PURE_MODULES = ["nbtool._util", "nbtool.engine", "nbtool.engine.persist", "nbtool.catalog",
                "nbtool.prediction", "nbtool.notebook", "nbtool.views", "nbtool.worker.runtimes",
                "nbtool.worker.auto", "nbtool.errors", "nbtool.worker.writing", "nbtool.wire", "nbtool._util.warn", "nbtool.engine.devices",
                "nbtool.catalog.registration", "nbtool.catalog.files", "nbtool.prediction.sources",
                "nbtool.prediction.inputs", "nbtool.prediction.store", "nbtool.prediction.metrics",
                "nbtool.notebook.magic_args", "nbtool._util.quiet",
                "nbtool.views.progress", "nbtool.views.sparklines",
                "nbtool.views.gpu_monitor", "nbtool.prediction.svg", "nbtool.prediction.report",
                "nbtool.preprocess", "nbtool.prediction.results", "nbtool.tables",
                "nbtool.prediction.output_memo", "nbtool.worker", "nbtool.worker.reading",
                "nbtool.signature", "nbtool.catalog.savedmodel_pb", "nbtool.prediction.binding",
                "nbtool.prediction.frames", "nbtool.prediction.result_table",
                "nbtool.worker.runtimes.fixed_batch", "nbtool.worker.runtimes.litert",
                "nbtool.worker.measure", "nbtool.worker.environment", "nbtool.worker.loading",
                "nbtool.worker.runtimes.predictors", "nbtool.worker.model_cache",
                "nbtool.worker.process", "nbtool.worker.variants", "nbtool.worker.tasks",
                "nbtool.worker.runtimes.openvino", "nbtool.worker.auto.agreement",
                "nbtool.worker.runtimes.to_litert", "nbtool.worker.auto.records",
                "nbtool.worker.auto.candidates", "nbtool.worker.auto.choice",
                "nbtool.worker.auto.guard", "nbtool.worker.auto.opening",
                "nbtool.worker.keras_backends", "nbtool.worker.runtimes.backend_predictors",
                "nbtool.engine.backends", "nbtool.worker.runtimes.openvino_files",
                "nbtool.prediction.planning", "nbtool.catalog.placement", "nbtool._util.settings",
                "nbtool.engine.session", "nbtool.catalog.catalog", "nbtool.catalog.loads",
                "nbtool.prediction.runs", "nbtool._util.private_files",
                "nbtool.engine.persist.engine_files", "nbtool.engine.engine",
                "nbtool.engine.persist.server", "nbtool.engine.persist.on_scheduler",
                "nbtool.engine.current", "nbtool.prediction.run",
                "nbtool.engine.persist.persistent", "nbtool.engine.persist.attached"]


@pytest.mark.parametrize("name", PURE_MODULES)
def test_docstring_examples_run(name, monkeypatch, tmp_path):
    monkeypatch.delenv("NBTOOL_FAKE_GPUS", raising=False)
    monkeypatch.setenv("NBTOOL_RUNTIME_DIR", str(tmp_path / "runtime"))   # engine files
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no runnable examples"
    assert result.failed == 0
