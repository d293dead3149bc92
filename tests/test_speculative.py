"""The drafting side of speculative decoding, without a model: n-gram lookup, the
draft-length policy and the mode flag."""

from __future__ import annotations

import pytest

from kvchat.errors import UsageError
from kvchat.speculative import DraftPolicy, NgramDrafter, Speculator, parse_mode, policy_for


def test_ngram_drafts_what_followed_the_latest_earlier_match() -> None:
    drafter = NgramDrafter(lengths=(2, 3, 4))
    context = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 7, 1, 2, 3]
    # The suffix (1, 2, 3) occurred twice before; the latest is followed by 7, 7, 1.
    # A 3-token match proposes at most 2 tokens.
    assert drafter.draft(context, 3) == [7, 7]
    assert drafter.draft(context, 1) == [7]


def test_a_match_proposes_one_token_less_than_its_length() -> None:
    run = list(range(100, 140))
    context = run + [0] + run[:20]  # copying `run` again: 20 tokens match so far
    assert NgramDrafter().draft(context, 64) == run[20:35]  # 16-token match: 15 tokens
    assert NgramDrafter().draft(context, 5) == run[20:25]  # never beyond n_max
    assert NgramDrafter().draft(run + [0] + run[:5], 64) == run[5:8]  # 4 tokens: 3
    assert NgramDrafter().draft(run + [0] + run[:3], 64) == run[3:4]  # 2 tokens: 1


def test_ngram_prefers_the_longest_match() -> None:
    drafter = NgramDrafter(lengths=(2, 3, 4))
    # (5, 6) alone last occurred before 30; (4, 5, 6) only before 20.
    context = [4, 5, 6, 20, 21, 9, 5, 6, 30, 31, 0, 4, 5, 6]
    assert drafter.draft(context, 2) == [20, 21]


def test_a_long_match_pins_the_place_being_copied() -> None:
    # Two blocks end alike ([7, 8, 9, 0] after their own bodies); the reply is copying
    # block A. The latest [8, 9, 0] is block B's, followed by B's next line (50); the
    # 8-token match with A's body finds A's next line (40).
    a, b = [11, 12, 13, 14, 15, 7, 8, 9, 0], [21, 22, 23, 24, 25, 7, 8, 9, 0]
    prompt = a + [40, 41] + b + [50, 51]
    assert NgramDrafter(lengths=(2, 3, 4)).draft(prompt + a, 2) == [50, 51]
    assert NgramDrafter(lengths=(2, 3, 4, 8)).draft(prompt + a, 2) == [40, 41]


def test_an_index_entry_whose_tokens_differ_is_never_proposed() -> None:
    # The index is keyed by hashes: a colliding entry must be caught by the comparison.
    drafter = NgramDrafter(lengths=(3, 2))
    context = [1, 2, 3, 4, 5, 6, 9, 4, 5]
    assert drafter.draft(context, 2) == [6]  # the 2-gram (4, 5)
    drafter._index[3][hash((9, 4, 5))] = [4]  # would propose [5, 6]; (2, 3, 4) precede it
    assert drafter.draft(context, 2) == [6]


def test_a_rewrite_copies_its_source_in_order() -> None:
    """An ambiguous match ("def name" starts every function) copies from the first
    place after the last draft's source, not from the latest place it occurred."""
    source = [7, 1, 50, 8, 7, 1, 51, 8, 7, 1, 52, 8]  # three functions: def name body end
    drafter = NgramDrafter(lengths=(3, 2))
    assert drafter.draft(source + [7, 1, 50], 1) == [8]  # a unique 3-gram: the first function
    reply = [7, 1, 50, 8, 99, 7, 1]  # copied, then a line of its own (99), then "def name"
    assert drafter.draft(source + reply, 1) == [51]  # the latest place says 50
    fresh = NgramDrafter(lengths=(3, 2))
    assert fresh.draft(source + reply, 1) == [50]  # no source yet: the latest place


def test_matches_of_a_length_that_does_not_pay_only_probe() -> None:
    drafter = NgramDrafter(lengths=(2, 4))
    short = [1, 2, 9, 8, 7, 1, 2]  # only the 2-gram (1, 2) matches
    long = [5, 6, 7, 8, 9, 0, 5, 6, 7, 8]  # a 4-token match
    assert drafter.draft(short, 4) == [9]
    drafter.feedback(0.3)  # the 2-token match's draft cost more than it saved
    assert drafter.paid[2] < 1.0
    proposed = [drafter.draft(short, 4) for _ in range(16)]
    assert [i for i, p in enumerate(proposed) if p] == [7, 15]  # a probe every 8th match
    drafter.feedback(3.0)  # the last probe paid well: the length drafts again
    assert drafter.paid[2] > 1.0 and drafter.draft(short, 4) == [9]
    assert drafter.draft(long, 4) == [9, 0, 5]  # other lengths keep their own record


def test_ngram_without_a_match_drafts_nothing() -> None:
    drafter = NgramDrafter(lengths=(2, 3, 4))
    assert drafter.draft([1, 2, 3, 4, 5, 6], 4) == []
    assert drafter.draft([1], 4) == []
    assert drafter.draft([1, 2, 1, 2], 0) == []


def test_ngram_index_follows_a_growing_context_and_rebuilds_on_a_new_one() -> None:
    drafter = NgramDrafter(lengths=(2, 3))
    context = [10, 11, 12, 13, 77, 10, 11, 12]
    assert drafter.draft(context, 2) == [13, 77]
    context += [99, 5, 10, 11, 12]  # the reply went on; (10, 11, 12) is now followed by 99, 5
    assert drafter.draft(context, 2) == [99, 5]
    # Another conversation (not an extension): nothing of the old one may be drafted.
    assert drafter.draft([50, 51, 52, 53, 10, 11, 12], 2) == []
    assert drafter.draft([50, 51, 52, 53, 10, 11, 12, 50, 51, 52], 2) == [53, 10]


def test_policy_waits_for_a_plain_step_to_know_what_a_token_costs() -> None:
    policy = DraftPolicy(n_draft=4)
    assert policy.budget() == 0
    policy.observe_plain(0.010)
    assert policy.budget() == 4


def test_policy_doubles_after_full_acceptance_and_falls_after_rejection() -> None:
    policy = DraftPolicy(n_draft=4, n_max=16)
    policy.observe_plain(0.010)
    policy.observe_draft(drafted=4, accepted=4, emitted=5, seconds=0.015)
    assert policy.budget() == 8
    policy.observe_draft(drafted=8, accepted=8, emitted=9, seconds=0.020)
    policy.observe_draft(drafted=16, accepted=16, emitted=17, seconds=0.030)
    assert policy.budget() == 16  # capped at n_max
    policy.observe_draft(drafted=16, accepted=2, emitted=3, seconds=0.030)
    assert policy.budget() == 3
    assert policy.counters.drafted == 44 and policy.counters.accepted == 30
    assert policy.counters.steps == 4


def test_ngram_verify_batches_fill_whole_multiples_of_four() -> None:
    policy = policy_for("ngram")
    policy.observe_plain(0.010)
    lengths = []
    for _ in range(5):
        n = policy.budget()
        lengths.append(n)
        policy.observe_draft(drafted=n, accepted=n, emitted=n + 1, seconds=0.012)
    assert lengths == [3, 7, 15, 15, 15]
    for accepted, then in ((0, 1), (1, 3), (4, 7), (9, 11)):
        policy.observe_draft(drafted=15, accepted=accepted, emitted=accepted + 1, seconds=0.05)
        assert policy.budget() == then
    assert DraftPolicy(n_draft=5, batch_multiple=4, n_max=15).budget() == 0  # no plain step yet
    assert DraftPolicy(n_draft=5, batch_multiple=4, n_max=15).n_draft == 7


def test_policy_pauses_while_drafting_costs_more_than_it_saves_then_probes_again() -> None:
    policy = DraftPolicy(n_draft=2, first_backoff=4, alpha=0.5)
    policy.observe_plain(0.010)
    # Rejected drafts: one token per 14 ms against 10 ms plainly.
    for _ in range(5):
        if policy.budget() == 0:
            break
        policy.observe_draft(drafted=2, accepted=0, emitted=1, seconds=0.014)
    assert policy.budget() == 0
    for _ in range(4):
        assert policy.budget() == 0
        policy.observe_plain(0.010)
    assert policy.budget() > 0  # the probe
    policy.observe_draft(drafted=1, accepted=0, emitted=1, seconds=0.014)
    assert policy.budget() == 0
    assert policy.cooldown == 8  # a second failure waits twice as long


def test_policy_keeps_drafting_while_it_pays() -> None:
    policy = DraftPolicy(n_draft=4, alpha=0.5)
    policy.observe_plain(0.010)
    for _ in range(20):
        policy.observe_draft(drafted=4, accepted=3, emitted=4, seconds=0.016)
        assert policy.budget() > 0


def _paused_after(policy: DraftPolicy, ratios: list[float]) -> bool:
    """Feed verify steps whose emitted tokens per plain-step time are `ratios`."""
    policy.observe_plain(0.010)
    for ratio in ratios:
        policy.observe_draft(drafted=4, accepted=3, emitted=4, seconds=0.040 / ratio)
        if policy.budget() == 0:
            return True
    return False


def test_ngram_drafting_rides_out_a_few_rejections_a_draft_model_does_not() -> None:
    # Copy-heavy text: drafts pay on average, with runs of rejections between.
    mixed = [2.0, 2.0, 2.0, 0.5, 0.5, 0.5]
    assert not _paused_after(policy_for("ngram"), mixed)
    assert _paused_after(policy_for("draft"), mixed)
    # Drafts that never pay still pause n-gram drafting, and never for long.
    ngram = policy_for("ngram")
    assert _paused_after(ngram, [0.5] * 20)
    for _ in range(10):
        ngram.observe_draft(drafted=1, accepted=0, emitted=1, seconds=0.020)
    assert ngram.cooldown <= 64
    assert Speculator(NgramDrafter()).policy.alpha == 0.1


def test_speculator_respects_the_room_left() -> None:
    policy = DraftPolicy(n_draft=8)
    policy.observe_plain(0.01)
    spec = Speculator(NgramDrafter(), policy)
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4]
    assert spec.propose(context, room=2) == [5, 6]
    assert spec.propose(context, room=0) == []


@pytest.mark.parametrize(
    ("value", "draft", "mode"),
    [(None, False, "ngram"), ("auto", True, "draft"), ("AUTO", False, "ngram"), ("off", True, "off"),
     ("ngram", True, "ngram"), ("draft", True, "draft")],
)
def test_parse_mode(value: str | None, draft: bool, mode: str) -> None:
    assert parse_mode(value, has_draft_model=draft) == mode


def test_parse_mode_refuses_unknown_modes_and_draft_without_a_model() -> None:
    with pytest.raises(UsageError, match="unknown --speculative"):
        parse_mode("fast", has_draft_model=False)
    with pytest.raises(UsageError, match="needs a draft model"):
        parse_mode("draft", has_draft_model=False)


class _RecurrentEngine:
    """Stands in for a model whose memory cannot drop a tail (Mamba, RWKV, hybrids)."""

    memory_kind = "recurrent"


@pytest.mark.parametrize(("asked", "warnings"), [(True, 1), (False, 0)])
def test_recurrent_models_stay_off_and_say_why_when_asked(asked: bool, warnings: int) -> None:
    from kvchat.app import SpeculationRequest, speculative_mode, start_speculation

    said: list[str] = []
    engine = _RecurrentEngine()
    got = start_speculation(engine, None, SpeculationRequest("ngram", None, asked), said.append)  # type: ignore[arg-type]
    assert got is engine  # not wrapped: plain decoding
    assert speculative_mode(got) == "off"
    assert len(said) == warnings
    assert all("stays off" in line and "recurrent" in line for line in said)
