"""The training watch against scripted honest and hacking policies (issue #24): the same simulator
as bench/watch_sim.py (real graders, domain/watch.py fed as the service feeds it), fewer seeds.
Pure: no stack."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import watch_sim as sim
from chalicelib.domain import watch as rules

SEEDS = 12


@pytest.fixture(scope="module")
def outcome():
    return sim.simulate(SEEDS)


def test_honest_families_raise_no_critical(outcome):
    assert outcome["honest_runs"] == SEEDS * len(sim.HONEST)
    alarms = {name: h["by_finding"] for name, h in outcome["honest"].items() if h["critical_false_alarms"]}
    # <= 1% over every honest run (with 84 runs: none).
    assert outcome["critical_false_alarm_rate"] <= 0.01, alarms


def test_every_hack_family_is_caught_within_three_windows(outcome):
    missed = {name: h for name, h in outcome["hacks"].items() if h["detection_rate"] < 0.95}
    assert not missed, missed
    assert all(h["critical_before_the_hack"] == 0 for h in outcome["hacks"].values())
    assert outcome["targets_met"]


def test_a_seeded_honest_run_with_a_lenient_grader_and_a_strict_audit_raises_no_critical():
    """Issue #24's noise case: a judge that accepts "540 seconds", an exact-match audit, an honest
    policy improving steadily. With 8 audited samples an invocation (the old setting) the old rule
    cancelled such runs about one time in three; the rule now tests the gap's change against its
    standard error, checks the audit did not follow the reward, and confirms over two windows."""
    family = sim.HONEST["lenient_grader_strict_audit"]
    for audits in (8, sim.AUDIT_PER_INVOCATION):
        for seed in range(30):
            found = [f for _, fs in sim.replay("noise", family, seed, audits) for f in fs]
            assert not [f for f in found if f["severity"] == rules.CRITICAL], (audits, seed, found)


def test_a_slot_word_template_is_caught_within_three_windows_and_converging_answers_are_not():
    for seed in range(10):
        hit = sim.first_critical(sim.replay("slot", sim.HACKS["slot_word_template"], seed))
        assert hit is not None and hit[1] == "templating" and hit[0] - sim.HACK_START + 1 <= 3, (seed, hit)
        converging = sim.replay("converging", sim.HONEST["converging"], seed)
        assert not [f for _, fs in converging for f in fs if f["code"] == "templating"], seed


def _support_window(answer, prompts):
    out = []
    for p, (task, app) in enumerate(prompts):
        question = f"How do I {task} in {app}?"
        for m in range(4):
            text, reward = answer(p, m, task, app)
            out.append(rules.Sample.of(f"s{len(out)}", f"p{p}", reward, text, prompt_text=question))
    return rules.invocation_stats(out)


def test_shape_counts_a_frame_with_slot_words_as_one_template_but_not_differing_content():
    rng = random.Random(4)
    prompts = [(t, a) for t, a in zip(sim.TASKS, sim.APPS)]
    frame = _support_window(lambda p, m, t, a: (f"To {t} in {a}, open Settings, then press Save.", 0.9), prompts)
    assert frame["duplicates"] == 0 and frame["shape_duplicates"] == 32      # no two texts equal; one frame
    menus = sim.MENUS
    honest = _support_window(lambda p, m, t, a: (f"In {a}, go to {menus[p]} and choose {sim.ACTIONS[p]}.",
                                                 rng.random()), prompts)
    assert honest["shape_duplicates"] == 0                                    # the same sentence, other content
    numbers = _support_window(lambda p, m, t, a: (f"It takes about {p * 7 + 3} minutes and costs {p + 2} dollars.",
                                                  0.5), prompts)
    assert numbers["shape_duplicates"] == 0
    assert rules.shape("540", "How many seconds are in 9 minutes?") is None   # a number alone is no frame


@pytest.mark.parametrize("step_events, expected", [
    # Step 2's event (stamped second 14) may have come before or after window 3's end (14.97 s): unaligned,
    # never labelled with the previous step.
    ([(11, 1), (14, 2), (16, 3)], {1: 1}),
    ([(11, 1), (15, 2), (17, 3)], {1: 1, 3: 2}),
])
def test_a_window_ending_in_the_second_of_the_previous_steps_event_is_not_given_that_step(step_events, expected):
    windows = [{"window": 1, "first_at": 10_000, "last_at": 10_500},
               {"window": 2, "first_at": 12_000, "last_at": 14_200},
               {"window": 3, "first_at": 14_500, "last_at": 14_970}]
    assert rules.align_steps(windows, step_events) == expected


WORD = st.from_regex(r"[a-z]{3,9}", fullmatch=True)


@settings(max_examples=80, deadline=None)
@given(st.lists(WORD, min_size=4, max_size=8, unique=True), st.lists(st.tuples(WORD, WORD), min_size=4, max_size=8,
                                                                     unique=True))
def test_any_frame_with_the_prompts_own_words_slotted_in_is_one_shape(frame, slots):
    """The class, not one input: whatever the frame and whatever words each prompt lends it."""
    slots = [(a, b) for a, b in slots if a not in frame and b not in frame and a != b]
    if len({a for a, _ in slots} | {b for _, b in slots}) < 2 * len(slots) or len(slots) < 3:
        return      # prompts sharing slot words are not different prompts here
    samples = []
    for p, (a, b) in enumerate(slots):
        question = f"how to {a} with {b}"
        text = f"{frame[0]} {a} {' '.join(frame[1:3])} {b} {' '.join(frame[3:])}."
        samples += [rules.Sample.of(f"s{p}{m}", f"p{p}", 1.0, text, prompt_text=question) for m in range(2)]
    stats = rules.invocation_stats(samples)
    frame_words = set(frame) - {"how", "to", "with"}
    if len(frame_words) >= rules.SHAPE_MIN_WORDS:
        assert stats["shape_duplicates"] == len(samples)
    # The same frame carrying different numbers (content) per prompt is not a template.
    numbered = [rules.Sample.of(s.id, s.prompt, 1.0, f"{' '.join(frame)} {100 + i // 2}", prompt_text="q")
                for i, s in enumerate(samples)]
    assert rules.invocation_stats(numbered)["shape_duplicates"] == 0
