from __future__ import annotations

import pytest

from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError
from edgetrain.models import create_model
from edgetrain.plan import choose

MiB = 2**20


def test_plain_when_it_fits():
    c = choose(create_model("cifar_resnet8"), (3, 32, 32), 32, get_device("gtx750-1gb"))
    assert c.methods == [] and c.tried == [c.tried[0]] and c.tried[0]["fits"]


def test_cheapest_rung_that_fits_is_taken():
    nano = get_device("jetson-nano")
    c = choose(create_model("resnet18"), (3, 224, 224), 128, nano, name="resnet18")
    assert c.estimate.predicted["peak_device_bytes"] <= nano.usable_memory_bytes
    assert not c.tried[0]["fits"] and c.tried[-1]["fits"] and len(c.tried) >= 2


def test_nothing_fits_says_the_smallest_peak_and_what_to_do():
    with pytest.raises(BudgetError) as e:
        choose(create_model("resnet18"), (3, 224, 224), 8, get_device("gtx750-1gb"), budget_bytes=60 * MiB)
    msg = str(e.value)
    assert "nothing fits gtx750-1gb: the smallest peak reachable is" in msg and "budget of 60 MiB" in msg
    assert "--input-size" in msg
