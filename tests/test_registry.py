import pytest

from edgekt.errors import EdgektError
from edgekt.registry import Registry


def test_registry_lookup_and_suggestion():
    reg: Registry = Registry("widget")
    reg.register("resnet18")(1)
    reg.register("mobilenet")(2)
    assert reg.get("resnet18") == 1 and "mobilenet" in reg
    assert reg.names() == ["mobilenet", "resnet18"]
    with pytest.raises(EdgektError, match="did you mean 'resnet18'.*valid: mobilenet, resnet18"):
        reg.get("resnet81")


def test_double_registration_is_a_bug():
    reg: Registry = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError):
        reg.register("a")(2)
