"""The story's spec copy: a re-roll, which starts from the copy, writes what a story run from the user's spec writes."""

from __future__ import annotations

import yaml

from kstory.story.spec_copy import derive_spec_text

USER_SPEC = "# my story\n" + yaml.safe_dump({
    "title": "t", "frame_count": 3,
    "frames": [{"prompt": f"frame {i}", "seed": 100 + i} for i in (1, 2, 3)],
}, sort_keys=False)


def _manifest(rerolled: dict[int, int]) -> dict:
    frames = {}
    for i in (1, 2, 3):
        seed = rerolled.get(i, 100 + i)
        frames[str(i)] = {"seed": seed, "frame_prompt": f"frame {i}", "spec_seed": 100 + i,
                          "spec_frame_prompt": f"frame {i}"}
    return {"frames": frames}


def test_a_second_re_roll_names_both_frames_as_a_story_run_does() -> None:
    after_first = derive_spec_text(USER_SPEC, _manifest({1: 7}))  # the copy the first re-roll left
    both = _manifest({1: 7, 3: 9})
    assert derive_spec_text(after_first, both) == derive_spec_text(USER_SPEC, both)
    assert derive_spec_text(after_first, both).startswith("# The spec as last generated, written by kstory: frames 1, 3")
    assert yaml.safe_load(derive_spec_text(after_first, both))["frames"][2]["seed"] == 9


def test_nothing_re_rolled_keeps_the_users_text() -> None:
    assert derive_spec_text(USER_SPEC, _manifest({})) == USER_SPEC
