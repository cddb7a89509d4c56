"""Pure parts of the registry: the champion history an audit trail leaves, and the input rules of
the registered generator."""

import math

import numpy as np
import pytest

from genmodels.tracking.registry import champion_history


def _entry(action, to_version, alias="champion"):
    return {"action": action, "to_version": to_version, "alias": alias}


def test_rollbacks_pop_the_champion_history_that_moves_push():
    trail = [_entry("first-champion", "1"), _entry("promote", "2"), _entry("promote", "4"), _entry("rollback", "2")]
    assert champion_history(trail) == ["1", "2"]
    assert champion_history(trail + [_entry("rollback", "1")]) == ["1"]
    assert champion_history(trail + [_entry("promote", "5", alias="staging")]) == ["1", "2"]  # other aliases do not count


def test_the_generator_refuses_bad_rows_by_name():
    from genmodels.tracking.generator_model import _count, _truncation

    assert _count({"num_images": np.int64(3)}) == 3
    for row in ({"num_images": 0}, {"num_images": 1.5}, {}):
        with pytest.raises(ValueError, match="num_images: expected an integer >= 1"):
            _count(row)
    assert _truncation(None) is None and _truncation(math.nan) is None and _truncation(np.float64(0.7)) == 0.7
    for value in (0, -1.0, "wide"):
        with pytest.raises(ValueError, match="truncation: expected a number > 0"):
            _truncation(value)
