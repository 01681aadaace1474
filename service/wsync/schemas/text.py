"""Text fields the engines tokenize: never empty (an empty prompt has no tokens to run on)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: One prompt or training text: 1..8192 characters (a byte-level tokenizer gives >= 1 token).
Text = Annotated[str, Field(min_length=1, max_length=8192, description="Non-empty text (1..8192 characters).")]
