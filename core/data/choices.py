"""Multiple-choice questions as LLaVA / MMBench lay them out: the options lettered ``A``,
``B``, ..., an optional ``Context:`` hint, and the instruction to answer with a letter. The
data sets that read such benchmarks build their prompts with it, and the benchmark scorers
(:mod:`mmbridge.evaluation.benchmarks`) read the letters back."""

from __future__ import annotations

from collections.abc import Sequence

#: LLaVA's instruction after the options (its MMBench / ScienceQA evaluation prompt).
ANSWER_WITH_LETTER = "Answer with the option's letter from the given choices directly."


def option_letters(n: int) -> list[str]:
    """``A``, ``B``, ... for ``n`` options."""
    return [chr(ord("A") + i) for i in range(n)]


def choice_prompt(
    question: str,
    options: Sequence[str],
    hint: str | None = None,
    instruction: str = ANSWER_WITH_LETTER,
) -> tuple[str, dict[str, str]]:
    """The question in the LLaVA / MMBench layout (``Context:`` hint, question, ``A. ...``
    lines, instruction) and its options by letter."""
    opts = dict(zip(option_letters(len(options)), (str(o) for o in options), strict=True))
    lines = [f"Context: {hint}"] if hint else []
    lines += [question, *(f"{k}. {v}" for k, v in opts.items())]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines), opts
