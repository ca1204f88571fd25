"""Starting an engine and the default one: arguments refused before any cluster starts, and
the module shortcuts acting on the engine started last."""

import pytest

import nbtool
from nbtool.errors import NbtoolError
from nbtool.engine.session import current_engine, set_default_engine


@pytest.mark.parametrize("kwargs, named", [
    ({"n_workers": 0}, "n_workers=0"),
    ({"n_workers": -2}, "n_workers=-2"),
    ({"n_workers": True}, "n_workers=True"),
    ({"memory_budget": "0"}, "memory_budget='0'"),
    ({"memory_budget": 0}, "memory_budget=0"),
    ({"memory_budget": "-1GB"}, "memory_budget='-1GB'"),
    ({"memory_budget": ""}, "memory_budget=''"),
    ({"memory_budget": "lots"}, "memory_budget='lots'"),
])
def test_zero_or_negative_counts_and_sizes_are_refused_not_read_as_the_default(
        kwargs, named, keep_default_engine):
    # Refused before any cluster starts, like chunk_size=0: nothing to clean up.
    with pytest.raises(ValueError) as refused:
        nbtool.start(gpus="none", dashboard_address="127.0.0.1:0", **kwargs)
    msg = str(refused.value)
    assert msg.startswith(named + ":"), msg
    assert "expected" in msg and ("'4GB'" in msg or "n_workers=2" in msg), msg


def test_the_shortcuts_act_on_the_engine_started_last_and_say_so_when_there_is_none(
        engine, model_dir, reference, unique, keep_default_engine):
    set_default_engine(engine)
    assert nbtool.default_engine() is engine is current_engine()
    nbtool.register(f"{unique}_s", model_dir / "mlp.keras")
    assert f"{unique}_s" in engine.registry                 # the shortcut reached it
    assert set_default_engine(None) is engine               # gives back the one it replaced
    assert current_engine() is None
    with pytest.raises(NbtoolError, match=r"no nbtool engine is running\. Fix: eng = "
                                          r"nbtool\.start\(\) first\."):
        nbtool.predict(f"{unique}_s", reference["x8"])
