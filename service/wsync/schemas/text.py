"""Text fields the engines tokenize: never empty (an empty prompt has no tokens to run on)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: One prompt or training text: 1..2048 characters (a byte-level tokenizer gives >= 1 token). The
#: upper bound keeps most texts within a small model's positions; the engines/trainer must still
#: truncate to the model's max positions (8192 random characters gave 8191 tokens > 1024 on the tiny model).
Text = Annotated[str, Field(min_length=1, max_length=2048, description="Non-empty text (1..2048 characters).")]
