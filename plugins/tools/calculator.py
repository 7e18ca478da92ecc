"""``calculator``: exact decimal arithmetic on an expression, for answers a model should not
compute in its head (Toolformer, 2302.04761, gives its LM a calculator for the same reason).

The expression is parsed with :mod:`ast` and only number literals, ``+ - * / // % **``, unary
signs and parentheses are evaluated, by a walk over the tree: nothing is ever ``eval``-ed, and
names, calls, attributes, subscripts, comparisons are refused with a message. Numbers are
:class:`decimal.Decimal` built from their source text, so ``2.40 + 3.10`` is ``5.50``, not
``5.500000000000001``. ``//`` and ``%`` follow Python (floor) semantics.
"""

from __future__ import annotations

import ast
import decimal
import math
from decimal import Decimal
from typing import Any, ClassVar

from mmbridge.errors import ConfigError, ToolError
from mmbridge.tools import Tool

#: Spellings a model may use that are not Python; translated before parsing.
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**"}
_SIGNIFICANT = 15  # digits shown of inexact results (1/3)


def _floor_div(a: Decimal, b: Decimal) -> Decimal:
    return (a / b).to_integral_value(rounding=decimal.ROUND_FLOOR)


_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: _floor_div,
    ast.Mod: lambda a, b: a - b * _floor_div(a, b),
}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
           ast.Mod: "%", ast.Pow: "**"}
_REFUSED = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes",
            ast.Subscript: "subscripts", ast.Compare: "comparisons", ast.BoolOp: "and/or",
            ast.Lambda: "lambdas", ast.Tuple: "commas",
            ast.List: "lists", ast.Dict: "dicts", ast.Set: "sets"}


def format_number(value: Decimal) -> str:
    """Decimal -> text: exact values as written (``5.50``), inexact ones to 15 digits,
    very large or small ones in scientific notation."""
    if value.is_zero():
        return "0"
    if len(value.as_tuple().digits) > _SIGNIFICANT:
        value = decimal.Context(prec=_SIGNIFICANT).plus(value).normalize()
    if -12 <= value.adjusted() < 40:
        return f"{value:f}"
    return f"{value:E}"


class CalculatorTool(Tool):
    """Exact arithmetic: ``+ - * / // % **`` and parentheses over decimal numbers.

    Args:
        max_length: Longest expression accepted (characters).
        max_exponent: Largest ``|exponent|`` of ``**``.
        max_digits: Results beyond ``10**max_digits`` are refused (bounds work and memory).
        timeout_s: Seconds a call may take.
    """

    name: ClassVar[str] = "calculator"  # the registry sets it to the registered name
    description: ClassVar[str] = (
        "Evaluate an arithmetic expression exactly, e.g. \"2.40 + 3.10 * 2\". Supports "
        "+ - * / // % ** and parentheses over decimal numbers; no variables or functions.")
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "the arithmetic expression"}},
        "required": ["expression"],
    }

    def __init__(self, max_length: int = 200, max_exponent: int = 100, max_digits: int = 100,
                 timeout_s: float = 5.0) -> None:
        for key, value in (("max_length", max_length), ("max_exponent", max_exponent),
                           ("max_digits", max_digits)):
            if value < 1:
                raise ConfigError(f"tools.calculator.{key}: {value} must be >= 1")
        self.max_length = max_length
        self.max_exponent = max_exponent
        self.max_digits = max_digits
        self.timeout_s = timeout_s

    def __call__(self, expression: str, **_: Any) -> str:
        return format_number(self.evaluate(expression))

    def evaluate(self, expression: str) -> Decimal:
        """The exact value of ``expression``.

        Raises:
            ToolError: the expression is too long, not arithmetic, or its value out of bounds;
                the message says which part.
        """
        if not isinstance(expression, str):
            raise ToolError(f"the expression must be text, got {type(expression).__name__}")
        text = expression.strip().rstrip("=").strip()
        if len(text) > self.max_length:
            raise ToolError(f"the expression is {len(text)} characters long; the limit is {self.max_length}")
        if not text:
            raise ToolError("the expression is empty")
        for spelling, op in _SPELLINGS.items():
            text = text.replace(spelling, op)
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ToolError(f"cannot parse {expression!r}: {exc.msg} at column {exc.offset}") from None
        # Emax bounds every intermediate value, so a chain of products cannot grow unbounded.
        ctx = decimal.Context(prec=50, Emax=self.max_digits, Emin=-self.max_digits - 50,
                              traps=[decimal.Overflow, decimal.DivisionByZero, decimal.InvalidOperation])
        try:
            with decimal.localcontext(ctx):
                return +self._eval(tree.body, text)
        except decimal.DivisionByZero:
            raise ToolError("division by zero") from None
        except decimal.Overflow:
            raise ToolError(f"the result exceeds 10**{self.max_digits}") from None
        except decimal.InvalidOperation:
            raise ToolError(f"invalid operation in {expression!r} (e.g. 0/0, or a fractional "
                            f"power of a negative number)") from None

    def _eval(self, node: ast.AST, source: str) -> Decimal:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ToolError(f"only numbers are allowed, got {node.value!r}")
            literal = ast.get_source_segment(source, node) or repr(node.value)
            return Decimal(literal.replace("_", ""))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._eval(node.operand, source)
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp) and type(node.op) in _SYMBOL:
            left, right = self._eval(node.left, source), self._eval(node.right, source)
            if isinstance(node.op, ast.Pow):
                return self._power(left, right)
            return _BINARY[type(node.op)](left, right)
        what = next((v for k, v in _REFUSED.items() if isinstance(node, k)),
                    f"'{type(node).__name__}' expressions")
        detail = (f" ({node.id!r})" if isinstance(node, ast.Name)
                  else " (write 1200, not 1,200)" if isinstance(node, ast.Tuple) else "")
        raise ToolError(f"{what} are not allowed{detail}; use numbers, + - * / // % ** and parentheses")

    def _power(self, base: Decimal, exponent: Decimal) -> Decimal:
        if abs(exponent) > self.max_exponent:
            raise ToolError(f"exponent {format_number(exponent)} is too large (limit: {self.max_exponent})")
        if not base.is_zero() and abs(base) != 1:
            # |base|**exponent has about exponent*log10|base| digits: refuse before computing
            digits = float(exponent) * math.log10(abs(float(base))) if float(base) else 0.0
            if digits > self.max_digits:
                raise ToolError(f"the result exceeds 10**{self.max_digits}")
        return base**exponent


COMPONENTS = {"tool": {"calculator": CalculatorTool}}
