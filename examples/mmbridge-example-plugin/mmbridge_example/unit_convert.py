"""``unit_convert``: exact conversion between units of length, mass, time, volume, area, speed,
energy, data size and temperature.

Language models convert units badly in their head (miles to kilometres, Fahrenheit to
Celsius, GiB to GB): a tool is the Tool Learning family's answer (2311.07594 §3.3; Toolformer,
arXiv 2302.04761, hands its LM a calculator for the same reason). Factors are exact decimals
(an inch is 0.0254 m by definition), so ``12 in -> cm`` is ``30.48``, not ``30.479999999``.
"""

from __future__ import annotations

import decimal
import difflib
from decimal import Decimal
from typing import Any, ClassVar

from mmbridge import Tool
from mmbridge.errors import ConfigError, ToolError

D = Decimal
_LB = D("0.45359237")  # kg, by definition (1959)
_GAL = D("0.003785411784")  # m^3, US liquid gallon
_CAL = D("4.184")  # J, thermochemical calorie

#: dimension -> unit -> factor to the dimension's SI unit; each unit's aliases follow in _ALIASES.
_UNITS: dict[str, dict[str, Decimal]] = {
    "length": {
        "m": D(1),
        "km": D(1000),
        "cm": D("0.01"),
        "mm": D("0.001"),
        "um": D("1e-6"),
        "nm": D("1e-9"),
        "in": D("0.0254"),
        "ft": D("0.3048"),
        "yd": D("0.9144"),
        "mi": D("1609.344"),
        "nmi": D(1852),
    },
    "mass": {
        "kg": D(1),
        "g": D("0.001"),
        "mg": D("1e-6"),
        "t": D(1000),
        "lb": _LB,
        "oz": _LB / 16,
        "st": _LB * 14,
    },
    "time": {
        "s": D(1),
        "ms": D("0.001"),
        "min": D(60),
        "h": D(3600),
        "day": D(86400),
        "week": D(604800),
        "year": D(31557600),
    },  # Julian year, 365.25 days
    "volume": {
        "m3": D(1),
        "l": D("0.001"),
        "ml": D("1e-6"),
        "cm3": D("1e-6"),
        "gal": _GAL,
        "qt": _GAL / 4,
        "pt": _GAL / 8,
        "cup": _GAL / 16,
        "floz": _GAL / 128,
    },
    "area": {
        "m2": D(1),
        "km2": D(1000000),
        "cm2": D("1e-4"),
        "ha": D(10000),
        "acre": D("4046.8564224"),
        "ft2": D("0.09290304"),
        "in2": D("0.00064516"),
        "mi2": D("2589988.110336"),
    },
    "speed": {
        "m/s": D(1),
        "km/h": D(1000) / 3600,
        "mph": D("1609.344") / 3600,
        "kn": D(1852) / 3600,
        "ft/s": D("0.3048"),
    },
    "energy": {
        "J": D(1),
        "kJ": D(1000),
        "cal": _CAL,
        "kcal": _CAL * 1000,
        "Wh": D(3600),
        "kWh": D(3600000),
        "eV": D("1.602176634e-19"),
    },
    "data": {
        "bit": D("0.125"),
        "B": D(1),
        "kB": D(1000),
        "MB": D(10**6),
        "GB": D(10**9),
        "TB": D(10**12),
        "KiB": D(2**10),
        "MiB": D(2**20),
        "GiB": D(2**30),
        "TiB": D(2**40),
    },
    # Temperatures are affine: to_kelvin(x) = (x + offset) * factor; see _to_base/_from_base.
    "temperature": {"K": D(1), "C": D(1), "F": D(5) / 9},
}
_OFFSETS = {"K": D(0), "C": D("273.15"), "F": D("459.67")}

#: other spellings (compared lower-case) -> canonical unit
_ALIASES: dict[str, str] = {
    "meter": "m",
    "meters": "m",
    "metre": "m",
    "metres": "m",
    "kilometer": "km",
    "kilometers": "km",
    "kilometre": "km",
    "kilometres": "km",
    "centimeter": "cm",
    "centimeters": "cm",
    "millimeter": "mm",
    "millimeters": "mm",
    "µm": "um",
    "micrometer": "um",
    "inch": "in",
    "inches": "in",
    '"': "in",
    "foot": "ft",
    "feet": "ft",
    "'": "ft",
    "yard": "yd",
    "yards": "yd",
    "mile": "mi",
    "miles": "mi",
    "nautical mile": "nmi",
    "nautical miles": "nmi",
    "kilogram": "kg",
    "kilograms": "kg",
    "kgs": "kg",
    "gram": "g",
    "grams": "g",
    "milligram": "mg",
    "tonne": "t",
    "tonnes": "t",
    "metric ton": "t",
    "pound": "lb",
    "pounds": "lb",
    "lbs": "lb",
    "ounce": "oz",
    "ounces": "oz",
    "stone": "st",
    "sec": "s",
    "second": "s",
    "seconds": "s",
    "millisecond": "ms",
    "milliseconds": "ms",
    "minute": "min",
    "minutes": "min",
    "hr": "h",
    "hour": "h",
    "hours": "h",
    "d": "day",
    "days": "day",
    "wk": "week",
    "weeks": "week",
    "yr": "year",
    "years": "year",
    "liter": "l",
    "liters": "l",
    "litre": "l",
    "litres": "l",
    "milliliter": "ml",
    "millilitre": "ml",
    "cc": "cm3",
    "m^3": "m3",
    "cm^3": "cm3",
    "gallon": "gal",
    "gallons": "gal",
    "quart": "qt",
    "pint": "pt",
    "cups": "cup",
    "fl oz": "floz",
    "m^2": "m2",
    "km^2": "km2",
    "cm^2": "cm2",
    "hectare": "ha",
    "hectares": "ha",
    "acres": "acre",
    "ft^2": "ft2",
    "sq ft": "ft2",
    "in^2": "in2",
    "mi^2": "mi2",
    "mps": "m/s",
    "kph": "km/h",
    "kmh": "km/h",
    "knot": "kn",
    "knots": "kn",
    "fps": "ft/s",
    "joule": "J",
    "joules": "J",
    "calorie": "cal",
    "calories": "cal",
    "kilocalorie": "kcal",
    "bits": "bit",
    "byte": "B",
    "bytes": "B",
    "kelvin": "K",
    "celsius": "C",
    "°c": "C",
    "degc": "C",
    "fahrenheit": "F",
    "°f": "F",
    "degf": "F",
}
_DIMENSION = {unit: dim for dim, units in _UNITS.items() for unit in units}
# Units whose lower-case spelling is unambiguous ("mb" could be millibar; "b" bit or byte).
_LOWER = {u.lower(): u for u in _DIMENSION if u not in ("B", "MB", "GB", "TB", "kB")}


def canonical_unit(text: str) -> str:
    """The canonical spelling of a unit (``"miles"`` -> ``"mi"``); :class:`ToolError` with the
    closest known units otherwise."""
    raw = str(text).strip()
    if raw in _DIMENSION:
        return raw
    key = raw.lower().removesuffix(".")
    unit = _ALIASES.get(key) or _LOWER.get(key)
    if unit is None:
        known = sorted(_DIMENSION) + sorted(_ALIASES)
        close = difflib.get_close_matches(raw, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ToolError(
            f"unknown unit {raw!r}{hint}; known units: "
            + "; ".join(f"{d}: {' '.join(u)}" for d, u in _UNITS.items())
        )
    return unit


def _to_base(value: Decimal, unit: str, dim: str) -> Decimal:
    if dim == "temperature":
        return (value + _OFFSETS[unit]) * _UNITS[dim][unit]
    return value * _UNITS[dim][unit]


def _from_base(value: Decimal, unit: str, dim: str) -> Decimal:
    if dim == "temperature":
        return value / _UNITS[dim][unit] - _OFFSETS[unit]
    return value / _UNITS[dim][unit]


def format_number(value: Decimal, digits: int) -> str:
    """``value`` to ``digits`` significant digits, without trailing zeros or exponent when the
    magnitude is moderate (``30.48``, ``0.000621371``), scientific otherwise (``1.60218E-19``)."""
    if value.is_zero():
        return "0"
    rounded = decimal.Context(prec=digits).plus(value).normalize()
    if -7 <= rounded.adjusted() < 16:
        text = f"{rounded:f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{rounded:E}"


class UnitConvertTool(Tool):
    """Convert a quantity between units (length, mass, time, volume, area, speed, energy, data
    size, temperature) with exact factors.

    Args:
        significant_digits: Digits of the result (exact results are shorter: ``30.48``).
        timeout_s: Seconds a call may take.
    """

    description: ClassVar[str] = (
        'Convert a quantity from one unit to another, e.g. value=26.2, from_unit="mi", '
        'to_unit="km". Units of length, mass, time, volume, area, speed, energy, data size '
        'and temperature (C, F, K); full names such as "miles" work too.'
    )
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "value": {"type": ["number", "string"], "description": "the quantity, e.g. 26.2"},
            "from_unit": {"type": "string", "description": 'the unit of value, e.g. "mi"'},
            "to_unit": {"type": "string", "description": 'the unit wanted, e.g. "km"'},
        },
        "required": ["value", "from_unit", "to_unit"],
    }

    def __init__(self, significant_digits: int = 6, timeout_s: float = 5.0) -> None:
        if not 1 <= int(significant_digits) <= 30:
            raise ConfigError(
                f"tools.unit_convert.significant_digits: must be in 1..30, got {significant_digits}"
            )
        self.significant_digits = int(significant_digits)
        self.timeout_s = float(timeout_s)

    def __call__(self, value: Any = None, from_unit: str = "", to_unit: str = "", **_: Any) -> str:
        result, src, dst = self.convert(value, from_unit, to_unit)
        digits = self.significant_digits
        return (
            f"{format_number(self._number(value), 30)} {src} = "
            f"{format_number(result, digits)} {dst}"
        )

    def convert(self, value: Any, from_unit: str, to_unit: str) -> tuple[Decimal, str, str]:
        """``(converted value, canonical from_unit, canonical to_unit)``, exact to 40 digits.

        Raises:
            ToolError: the value is not a finite number, a unit is unknown, or the units measure
                different things; the message says which and lists the options.
        """
        number = self._number(value)
        src, dst = canonical_unit(from_unit), canonical_unit(to_unit)
        dim_src, dim_dst = _DIMENSION[src], _DIMENSION[dst]
        if dim_src != dim_dst:
            raise ToolError(
                f"cannot convert {src} ({dim_src}) to {dst} ({dim_dst}); units of "
                f"{dim_src}: {', '.join(_UNITS[dim_src])}"
            )
        with decimal.localcontext(decimal.Context(prec=40)):
            base = _to_base(number, src, dim_src)
            if dim_src == "temperature" and base < 0:
                raise ToolError(f"{format_number(number, 30)} {src} is below absolute zero")
            return _from_base(base, dst, dim_dst), src, dst

    @staticmethod
    def _number(value: Any) -> Decimal:
        if isinstance(value, bool) or value is None:
            raise ToolError(f"value must be a number, got {value!r}")
        text = str(value).strip().replace(",", "").replace("_", "")
        try:
            number = Decimal(text)
        except decimal.InvalidOperation:
            raise ToolError(f"value must be a number, got {value!r}") from None
        if not number.is_finite():
            raise ToolError(f"value must be a finite number, got {value!r}")
        return number
