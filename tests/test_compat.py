"""Old import paths keep working (with a DeprecationWarning) after the package was reorganised."""

import importlib

import pytest

import adalora
from adalora.files import adapter, atomic, peft
from adalora.integrations import loop
from adalora.parallel import save_adapter_collective
from adalora.run import convert


@pytest.mark.parametrize(
    ("old_module", "name", "new"),
    [
        ("adalora.io", "save_adapter", adapter.save_adapter),
        ("adalora.io", "atomic_directory", atomic.atomic_directory),
        ("adalora.io", "find_adapter_dir", convert.find_adapter_dir),
        ("adalora.peft_format", "export_peft", peft.export_peft),
        ("adalora.peft_format", "export_output_dir", convert.export_output_dir),
        ("adalora.checkpoint", "atomic_write", atomic.atomic_write),
        ("adalora.distributed", "save_adapter", save_adapter_collective),
        ("adalora.training", "fit", loop.fit),
    ],
)
def test_old_module_paths_forward_with_a_warning(old_module, name, new):
    module = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning, match="moved to"):
        assert getattr(module, name) is new


def test_old_module_paths_refuse_unknown_names():
    module = importlib.import_module("adalora.io")
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018


def test_names_dropped_from_the_top_level_still_resolve_with_a_warning():
    from adalora.allocator import top_b_mask
    from adalora.layers import SVDLinear

    with pytest.warns(DeprecationWarning, match="adalora.layers"):
        assert adalora.SVDLinear is SVDLinear
    with pytest.warns(DeprecationWarning, match="adalora.allocator"):
        assert adalora.top_b_mask is top_b_mask
    assert "SVDLinear" not in adalora.__all__
    for name in adalora.__all__:  # the public surface resolves without a warning
        getattr(adalora, name)
