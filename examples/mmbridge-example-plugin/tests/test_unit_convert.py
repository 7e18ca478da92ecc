"""The ``unit_convert`` tool: exact values, and errors a model can act on."""

from __future__ import annotations

import re

import pytest
from mmbridge.errors import ToolError
from mmbridge.tool_runtime import execute, parse_calls

from mmbridge_example.unit_convert import UnitConvertTool


@pytest.mark.parametrize(
    ("value", "src", "dst", "text"),
    [
        (12, "in", "cm", "12 in = 30.48 cm"),
        (26.2, "miles", "km", "26.2 mi = 42.1648 km"),
        (98.6, "°F", "celsius", "98.6 F = 37 C"),
        (0, "K", "F", "0 K = -459.67 F"),
        (1, "GiB", "MB", "1 GiB = 1073.74 MB"),
        ("1,200", "g", "lb", "1200 g = 2.64555 lb"),
        (100, "km/h", "mph", "100 km/h = 62.1371 mph"),
        (1, "kWh", "kcal", "1 kWh = 860.421 kcal"),
    ],
)
def test_conversions(value, src, dst, text):
    assert UnitConvertTool()(value=value, from_unit=src, to_unit=dst) == text


def test_round_trip_is_exact():
    tool = UnitConvertTool()
    there, _, _ = tool.convert(7, "mi", "in")
    back, _, _ = tool.convert(there, "in", "mi")
    assert there == 443520 and back == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, "km", "kg"), "cannot convert km (length) to kg (mass)"),
        ((1, "kilometr", "m"), "did you mean 'kilometre'"),
        (("lots", "m", "km"), "value must be a number"),
        ((-300, "C", "K"), "below absolute zero"),
    ],
)
def test_errors_say_what_to_fix(args, message):
    with pytest.raises(ToolError, match=re.escape(message)):
        UnitConvertTool()(*args)


def test_a_model_written_call_runs_through_mmbridge_tool_runtime():
    tool = UnitConvertTool(significant_digits=4)
    tool.name = "unit_convert"  # the registry sets this when the plugin registers the class
    text = (
        '<tool_call>{"name": "unit_convert", "arguments": {"value": 5, "from_unit": "km", '
        '"to_unit": "mi"}}</tool_call>'
    )
    _, (call,) = parse_calls(text)
    result = execute({"unit_convert": tool}, call.name, call.arguments, media={})
    assert result.ok and result.result == "5 km = 3.107 mi"
    bad = execute({"unit_convert": tool}, "unit_convert", {"value": 5, "from_unit": "km"}, media={})
    assert not bad.ok and "missing required argument 'to_unit'" in bad.result
