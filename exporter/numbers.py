"""Phone numbers as the caller level compares them, and the company's lines by name.

Events write one number in several ways (`0222202999`, `421222202999`, `+421 2 2220 2999`): the
national prefix, the country code and the spacing differ, the subscriber's last digits do not. So
two numbers are the same when the last `match_digits` of their digits are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

DEFAULT_MATCH_DIGITS = 9
OTHER_LINE = "other"  # the `line` label of a company number that is not configured
NO_LINE = ""  # the `line` label of an event without a company number


def number_key(number: str | None, match_digits: int = DEFAULT_MATCH_DIGITS) -> str | None:
    """The digits two spellings of one number share: the last `match_digits`; None if none."""
    if number is None:
        return None
    return _key(number, match_digits)


@lru_cache(maxsize=4096)  # company numbers and busy callers recur, under the write lock
def _key(number: str, match_digits: int) -> str | None:
    return _NOT_A_DIGIT.sub("", number)[-match_digits:] or None


_NOT_A_DIGIT = re.compile(r"[^0-9]")  # ASCII digits only, as the provider writes them


@dataclass(frozen=True)
class Lines:
    """An account's company numbers (`did_mcn`) and their names, matched like any number.

    Company numbers never become label values: `line` is the configured name, "" without a
    number, `other` for a number not configured.
    """

    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    match_digits: int = DEFAULT_MATCH_DIGITS

    @classmethod
    def from_config(
        cls, numbers: Mapping[str, str], match_digits: int = DEFAULT_MATCH_DIGITS
    ) -> Lines:
        """From `accounts[].lines`, number to name. A number with no digits matches nothing."""
        names: dict[str, str] = {}
        for number, name in numbers.items():
            key = number_key(number, match_digits)
            if key is not None:
                names[key] = name
        return cls(MappingProxyType(names), match_digits)

    def line(self, company_number: str | None) -> str:
        if company_number is None:
            return NO_LINE
        key = number_key(company_number, self.match_digits)
        if key is None:
            return OTHER_LINE
        return self.names.get(key, OTHER_LINE)

    def label_values(self) -> tuple[str, ...]:
        """Every `line` value a configured account can show at once: its zero series."""
        return (NO_LINE, *sorted(set(self.names.values())), OTHER_LINE)
