"""`compose down -v` leaves nothing behind, and the next `up` starts from empty state. Runs last."""
from __future__ import annotations

import openai
import pytest

from tests.compose import harness
from tests.compose.conftest import Stack


def test_down_leaves_nothing_and_a_second_up_starts_clean(stack: Stack) -> None:
    c = stack.client()
    kept = c.responses.create(model="sim-llama", input="Remember this.", max_output_tokens=4)
    assert c.responses.retrieve(kept.id).id == kept.id

    stack.down()  # raises if any container, pod, network or volume of the project is left
    assert harness.leftovers() == {}

    stack.up()
    stack.wait_ready()
    with pytest.raises(openai.NotFoundError):
        stack.client().responses.retrieve(kept.id)  # the Redis volume went with `down -v`
