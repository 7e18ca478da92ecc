"""``calculator``: exact arithmetic on an expression, for answers a model should not compute in
its head (Toolformer, 2302.04761, gives its LM a calculator for the same reason).

The expression is parsed with :mod:`ast` and only number literals, ``+ - * / // % **``, unary
signs and parentheses are evaluated, by a walk over the tree: nothing is ever ``eval``-ed, and
names, calls, attributes, subscripts, comparisons are refused with a message.

Results are exact. Numbers are :class:`decimal.Decimal` built from their source text, and the
walk runs in a context wide enough for every value within the bounds and with ``Inexact``
trapped, so ``2.40 + 3.10`` is ``5.50`` and ``2**64`` is ``18446744073709551616``. When a step
cannot be exact in decimal (``1/3``, ``2**0.5``), the expression is evaluated again over
:class:`fractions.Fraction` (rational roots such as ``8**(1/3)`` stay exact); a value that is
still not a finite decimal is shown to 15 significant digits and the result says so:
``0.333333333333333 (rounded to 15 significant digits)``. ``//`` and ``%`` follow Python
(floor) semantics. Work is bounded: ``|exponent| <= max_exponent`` and every value between
``10**-(max_digits + 50)`` and ``10**max_digits`` (checked from an estimate before a power is
computed, and on literals before they are converted: ``1e999999999`` is short text).
"""

from __future__ import annotations

import ast
import decimal
import math
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any, ClassVar

from mmbridge.contracts.tools import Tool
from mmbridge.errors import ConfigError, ToolError

#: Spellings a model may use that are not Python; translated before parsing.
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**"}
_SIGNIFICANT = 15  # digits shown of a result that is not a finite decimal (1/3)
_MAX_ROOT = 64  # largest q of an exponent p/q whose exact rational root is looked for
ROUNDED_NOTE = f" (rounded to {_SIGNIFICANT} significant digits)"

_SYMBOL = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}
_REFUSED = {
    ast.Name: "names",
    ast.Call: "function calls",
    ast.Attribute: "attributes",
    ast.Subscript: "subscripts",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.Lambda: "lambdas",
    ast.Tuple: "commas",
    ast.List: "lists",
    ast.Dict: "dicts",
    ast.Set: "sets",
}


class _NotDecimal(Exception):
    """A step of the decimal walk cannot be exact: evaluate over fractions instead."""


def _floor_div(a: Decimal, b: Decimal) -> Decimal:
    return (a / b).to_integral_value(rounding=decimal.ROUND_FLOOR)


_DECIMAL_OPS: dict[type, Callable[[Decimal, Decimal], Decimal]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: _floor_div,
    ast.Mod: lambda a, b: a - b * _floor_div(a, b),
}
_FRACTION_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: lambda a, b: a % b,
}


def _wide(digits: int) -> decimal.Context:
    return decimal.Context(prec=digits, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def format_number(value: Decimal) -> str:
    """An exact decimal -> text with every digit: as written (``5.50``), plain between
    ``1e-12`` and ``1e40``, else scientific (``1E+50``, ``1.8446744073709551616E+60``)."""
    if value.is_zero():
        return "0"
    if -12 <= value.adjusted() < 40:
        return f"{value:f}"
    return f"{_wide(len(value.as_tuple().digits) + 2).normalize(value):E}"


def _terminating(value: Fraction) -> Decimal | None:
    """``value`` as an exact Decimal when it is a finite decimal (denominator ``2^a 5^b``)."""
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return None
    places = max(twos, fives)
    digits = value.numerator * 10**places // value.denominator
    # scaleb rounds to its context's precision: the default 28 digits cut 2**100 // 3
    return Decimal(digits).scaleb(-places, context=_wide(len(str(abs(digits))) + 2))


def _rounded(value: Fraction) -> Decimal:
    ctx = decimal.Context(prec=_SIGNIFICANT, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
    return ctx.normalize(ctx.divide(Decimal(value.numerator), Decimal(value.denominator)))


def _iroot(n: int, q: int) -> int | None:
    """The integer ``r >= 0`` with ``r**q == n`` (``n >= 0``), or ``None``."""
    if n < 2:
        return n
    guess = int(_wide(len(str(n)) + 10).power(Decimal(n), Decimal(1) / Decimal(q)))
    return next((r for r in (guess - 1, guess, guess + 1) if r >= 0 and r**q == n), None)


def _log10(value: Fraction) -> float:
    """``log10 |value|`` of a non-zero fraction (exact for huge numerators: no float overflow)."""
    return math.log10(abs(value.numerator)) - math.log10(value.denominator)


class CalculatorTool(Tool):
    """Exact arithmetic: ``+ - * / // % **`` and parentheses over decimal numbers.

    Args:
        max_length: Longest expression accepted (characters).
        max_exponent: Largest ``|exponent|`` of ``**``.
        max_digits: Values beyond ``10**max_digits`` (or below ``10**-(max_digits + 50)``) are
            refused (bounds work and memory).
        timeout_s: Seconds a call may take.
    """

    name: ClassVar[str] = "calculator"  # the registry sets it to the registered name
    description: ClassVar[str] = (
        'Evaluate an arithmetic expression exactly, e.g. "2.40 + 3.10 * 2". Supports '
        "+ - * / // % ** and parentheses over decimal numbers; no variables or functions."
    )
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "expression": {"type": "string", "description": "the arithmetic expression"}
        },
        "required": ["expression"],
    }

    def __init__(
        self,
        max_length: int = 200,
        max_exponent: int = 100,
        max_digits: int = 100,
        timeout_s: float = 5.0,
    ) -> None:
        for key, value in (
            ("max_length", max_length),
            ("max_exponent", max_exponent),
            ("max_digits", max_digits),
        ):
            if value < 1:
                raise ConfigError(f"tools.calculator.{key}: {value} must be >= 1")
        self.max_length = max_length
        self.max_exponent = max_exponent
        self.max_digits = max_digits
        self.timeout_s = timeout_s

    def __call__(self, expression: str, **_: Any) -> str:
        value, exact = self.evaluate(expression)
        if exact:
            return format_number(value)
        return format_number(value) + ROUNDED_NOTE

    def evaluate(self, expression: str) -> tuple[Decimal, bool]:
        """The value of ``expression`` and whether it is exact.

        Returns:
            ``(value, True)`` with every digit when the result is a finite decimal, else
            ``(value to 15 significant digits, False)``.

        Raises:
            ToolError: the expression is too long, not arithmetic, or its value out of bounds;
                the message says which part.
        """
        if not isinstance(expression, str):
            raise ToolError(f"the expression must be text, got {type(expression).__name__}")
        text = expression.strip().rstrip("=").strip()
        if len(text) > self.max_length:
            raise ToolError(
                f"the expression is {len(text)} characters long; the limit is {self.max_length}"
            )
        if not text:
            raise ToolError("the expression is empty")
        for spelling, op in _SPELLINGS.items():
            text = text.replace(spelling, op)
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ToolError(
                f"cannot parse {expression!r}: {exc.msg} at column {exc.offset}"
            ) from None
        try:
            return self._check(self._decimal_walk(tree.body, text)), True
        except _NotDecimal:
            pass
        try:
            value, exact = self._fraction(tree.body, text)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        value = self._check(value)
        finite = _terminating(value) if exact else None
        return (finite, True) if finite is not None else (_rounded(value), False)

    # -- the exact decimal walk ---------------------------------------------------------------
    def _decimal_walk(self, node: ast.AST, source: str) -> Decimal:
        # Wide enough for every value within the bounds: anything that still rounds is Inexact.
        ctx = decimal.Context(
            prec=2 * self.max_digits + 60,
            Emax=self.max_digits,
            Emin=-self.max_digits - 50,
            traps=[
                decimal.Overflow,
                decimal.DivisionByZero,
                decimal.InvalidOperation,
                decimal.Inexact,
            ],
        )
        try:
            with decimal.localcontext(ctx):
                return +self._eval_decimal(node, source)
        except decimal.Inexact:
            raise _NotDecimal from None
        except decimal.DivisionByZero:
            raise ToolError("division by zero") from None
        except decimal.Overflow:
            raise ToolError(f"the result exceeds 10**{self.max_digits}") from None
        except decimal.InvalidOperation:
            raise ToolError(
                f"invalid operation in {source!r} (e.g. 0/0, or a fractional power "
                f"of a negative number)"
            ) from None

    def _eval_decimal(self, node: ast.AST, source: str) -> Decimal:
        if isinstance(node, ast.Constant):
            return self._literal(node, source)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._eval_decimal(node.operand, source)
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp) and type(node.op) in _SYMBOL:
            left, right = (
                self._eval_decimal(node.left, source),
                self._eval_decimal(node.right, source),
            )
            if isinstance(node.op, ast.Pow):
                if left.is_zero() and right <= 0:
                    if right.is_zero():
                        return Decimal(1)  # 0**0, as Python and most calculators have it
                    raise ToolError("division by zero (0 to a negative power)")
                self._check_power(Fraction(left), Fraction(right))
                if right != right.to_integral_value():
                    raise _NotDecimal  # decimal flags every non-integer power Inexact
                return left**right
            return _DECIMAL_OPS[type(node.op)](left, right)
        raise self._refuse(node)

    # -- the rational walk, for what decimals cannot hold exactly -------------------------------
    def _fraction(self, node: ast.AST, source: str) -> tuple[Fraction, bool]:
        """``(value, exact)`` over rationals; only irrational powers are approximated."""
        if isinstance(node, ast.Constant):
            return Fraction(self._literal(node, source)), True
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value, exact = self._fraction(node.operand, source)
            return (-value if isinstance(node.op, ast.USub) else value), exact
        if isinstance(node, ast.BinOp) and type(node.op) in _SYMBOL:
            (a, exact_a), (b, exact_b) = (
                self._fraction(node.left, source),
                self._fraction(node.right, source),
            )
            if isinstance(node.op, ast.Pow):
                value, exact = self._fraction_power(a, b)
            else:
                value, exact = _FRACTION_OPS[type(node.op)](a, b), True
            return self._bound(value, exact and exact_a and exact_b)
        raise self._refuse(node)

    def _fraction_power(self, base: Fraction, exponent: Fraction) -> tuple[Fraction, bool]:
        self._check_power(base, exponent)
        if base == 0 and exponent < 0:
            raise ToolError("division by zero (0 to a negative power)")
        if exponent.denominator == 1:
            return base ** int(exponent), True
        if base < 0:
            raise ToolError(
                f"invalid operation: a fractional power ({_show(exponent)}) of a "
                f"negative number ({_show(base)})"
            )
        if base == 0:
            return Fraction(0), True
        p, q = exponent.numerator, exponent.denominator
        if q <= _MAX_ROOT:
            num, den = _iroot(base.numerator, q), _iroot(base.denominator, q)
            if num is not None and den is not None:
                return Fraction(num, den) ** p, True
        ctx = _wide(50)
        approx = ctx.power(
            ctx.divide(Decimal(base.numerator), Decimal(base.denominator)),
            ctx.divide(Decimal(p), Decimal(q)),
        )
        return Fraction(approx), False

    def _bound(self, value: Fraction, exact: bool) -> tuple[Fraction, bool]:
        """Refuse values out of range; keep denominators small (an approximation is inexact)."""
        if value:
            self._check_magnitude(_log10(value))
        limit = 10 ** (2 * self.max_digits + 60)
        if value.denominator > limit:
            return value.limit_denominator(limit), False
        return value, exact

    # -- shared -------------------------------------------------------------------------------
    def _literal(self, node: ast.Constant, source: str) -> Decimal:
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"only numbers are allowed, got {node.value!r}")
        literal = (ast.get_source_segment(source, node) or repr(node.value)).replace("_", "")
        try:
            value = Decimal(literal)
        except decimal.InvalidOperation:  # 0x1f, 0o17, 0b101: Python's other integer spellings
            value = Decimal(node.value)
        # Checked before any conversion to an integer or fraction: 1e999999999 is short text.
        if not value.is_zero() and not -self.max_digits - 50 <= value.adjusted() <= self.max_digits:
            raise ToolError(
                f"the number {literal} is out of range (between 10**-"
                f"{self.max_digits + 50} and 10**{self.max_digits})"
            )
        return value

    def _check_power(self, base: Fraction, exponent: Fraction) -> None:
        if abs(exponent) > self.max_exponent:
            raise ToolError(f"exponent {_show(exponent)} is too large (limit: {self.max_exponent})")
        # |base|**exponent is about 10**(exponent*log10|base|): refuse before computing
        if base and abs(base) != 1:
            self._check_magnitude(float(exponent) * _log10(base))

    def _check(self, value: Decimal | Fraction) -> Any:
        if value:
            self._check_magnitude(_log10(Fraction(value)))
        return value

    def _check_magnitude(self, log10: float) -> None:
        if log10 > self.max_digits:
            raise ToolError(f"the result exceeds 10**{self.max_digits}")
        if log10 < -self.max_digits - 50:
            raise ToolError(
                f"the result is smaller than 10**-{self.max_digits + 50} (out of range)"
            )

    def _refuse(self, node: ast.AST) -> ToolError:
        what = next(
            (v for k, v in _REFUSED.items() if isinstance(node, k)),
            f"'{type(node).__name__}' expressions",
        )
        detail = (
            f" ({node.id!r})"
            if isinstance(node, ast.Name)
            else " (write 1200, not 1,200)"
            if isinstance(node, ast.Tuple)
            else ""
        )
        return ToolError(
            f"{what} are not allowed{detail}; use numbers, + - * / // % ** and parentheses"
        )


def _show(value: Fraction) -> str:
    finite = _terminating(value)
    return format_number(finite) if finite is not None else str(value)


COMPONENTS = {"tool": {"calculator": CalculatorTool}}
