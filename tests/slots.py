"""Driving a server's decode slots (``SlotBatcher``) by hand, as the scheduler would."""

from __future__ import annotations

from ryzen_jax.engine.batcher import Admission, Plan, SlotBatcher
from ryzen_jax.engine.request import Request


def three_requests_in_two_slots(batcher: SlotBatcher, requests: list[Request], steps: tuple[int, int, int]) -> list:
    """Admit requests 0 and 1 into slots 0 and 1 at different steps (``steps[0]`` decode
    steps after the first, ``steps[1]`` after the second), the third into the first slot
    freed, the moment it is freed; decode ``steps[2]`` at a time until all three finish.
    Returns each request's generated tokens, in the order they finished."""
    tokens: dict[int, list[int]] = {}
    finished: list[list[int]] = []

    def apply(plan: Plan) -> None:
        out = batcher.apply(plan)
        for d in out.deltas:
            tokens.setdefault(d.index, []).extend(d.token_ids)
        for slot in out.finished:
            finished.append(tokens.pop(slot))
            if len(finished) == 1:  # the freed slot takes the third request at once
                apply(Plan(admit=(Admission(slot, requests[2], 0),), steps=0))

    apply(Plan(admit=(Admission(0, requests[0], 0),), steps=steps[0]))
    apply(Plan(admit=(Admission(1, requests[1], 0),), steps=steps[1]))
    while len(finished) < 3:
        apply(Plan(steps=steps[2]))
    return finished
