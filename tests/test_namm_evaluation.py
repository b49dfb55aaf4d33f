"""NAMM at a budget (the scorer's top entries), tasks by name, and presses compared on the same examples."""

import pytest
import torch

from memorycore import InputError
from memorycore.attention import KVCache
from memorycore.lm.model import TitansLM
from memorycore.namm import BAMScorer, H2OPress, NAMMPress, fit_namm, make_press
from memorycore.namm.evaluation import TASKS, cache_entries, check_pressable, compare_presses, make_task
from memorycore.titans import TitansConfig


def small_lm(variant: str = "attention") -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(64, TitansConfig(dim=16, depth=2, heads=2, variant=variant, memory_chunk=8)).eval()


def random_scorer(seed: int) -> BAMScorer:
    torch.manual_seed(seed)
    return BAMScorer(4).load_vector(torch.randn(BAMScorer(4).num_parameters))


def full_cache(heads: int, capacity: int) -> KVCache:
    """One batch element, ``heads`` heads holding ``capacity`` entries at positions 0, 1, ..."""
    positions = torch.arange(capacity).expand(1, heads, capacity).clone()
    return KVCache(torch.randn(1, heads, capacity, 4), torch.randn(1, heads, capacity, 4), positions,
                   torch.ones(1, heads, capacity, dtype=torch.bool))


def test_namm_at_a_budget_keeps_the_scorers_top_entries_and_the_newest():
    scorer, capacity = random_scorer(0), 10
    cache = full_cache(2, capacity)
    press = NAMMPress(scorer, budget=0.3, interval=capacity)
    pressed = press.compress("layer", cache, torch.rand(1, 2, capacity, capacity).tril())
    assert pressed.lengths.tolist() == [[3, 3]]  # ceil(0.3 * 10)
    for head in range(2):
        kept = set(pressed.positions[0, head][pressed.valid[0, head]].tolist())
        assert capacity - 1 in kept  # the newest, whatever its score
        assert len(kept) == 3


def test_namm_at_a_budget_is_brute_force_top_k():
    scorer, capacity = random_scorer(1), 12
    cache = full_cache(1, capacity)
    positions = cache.positions
    press = NAMMPress(scorer, budget=0.5, interval=capacity)
    observed = press.observe(cache, torch.rand(1, 1, capacity, capacity).tril(), capacity)
    scores = scorer.score(observed, capacity)[0, 0].detach()
    expected = {capacity - 1, *sorted(range(capacity - 1), key=lambda p: -float(scores[p]))[:5]}
    keep = press.keep(observed, capacity, capacity) | (positions == capacity - 1)
    assert set(positions[keep].tolist()) == expected


def test_budget_must_be_a_share():
    with pytest.raises(InputError, match="budget"):
        NAMMPress(budget=1.5)
    with pytest.raises(InputError, match="budget"):
        fit_namm(small_lm(), make_task("passkey", seq_len=64, vocab_size=64), generations=1, budget=0.0)


@pytest.mark.parametrize("name", [t for t in TASKS if t != "lm-loss"])
def test_tasks_by_name_draw_examples_in_the_vocabulary(name):
    task = make_task(name, seq_len=48, vocab_size=64)
    inputs, labels = task.sample(3, torch.Generator().manual_seed(0))
    assert inputs.shape == (3, 48) and int(inputs.max()) < 64 and bool((labels != -100).any())


def test_tasks_refuse_what_the_vocabulary_cannot_hold():
    with pytest.raises(InputError, match="unknown task"):
        make_task("sorting", seq_len=64, vocab_size=256)
    with pytest.raises(InputError, match="vocabulary larger"):
        make_task("mqar", seq_len=512, vocab_size=256)
    with pytest.raises(InputError, match="vocab_size"):
        make_task("passkey", seq_len=64, vocab_size=16)
    with pytest.raises(InputError, match="--data"):
        make_task("lm-loss", seq_len=64, vocab_size=256)


def test_a_model_without_attention_is_refused():
    check_pressable(small_lm("mac"))
    with pytest.raises(InputError, match="no attention cache"):
        check_pressable(small_lm("lmm"))


def test_compare_presses_on_the_same_examples():
    model = small_lm()
    task = make_task("needle", seq_len=64, vocab_size=64)
    results = compare_presses(model, task, {"full": None, "h2o": H2OPress(0.25, interval=16),
                                            "namm": NAMMPress(BAMScorer(4), interval=16)},
                              interval=16, examples=3, batch_size=2, decode_tokens=2)
    by_name = {r.name: r for r in results}
    # 2 layers x 2 heads x 64 entries per example with the full cache; h2o ends at ceil(0.25 * 64) = 16 per head
    assert by_name["full"].cache_entries == 2 * 2 * 64 and by_name["full"].kept == 1.0
    assert by_name["h2o"].kept == 0.25
    assert by_name["namm"].kept == 1.0  # the untrained scorer keeps everything...
    assert by_name["namm"].score == by_name["full"].score  # ...so it answers as the full cache
    assert all(r.tokens_per_second > 0 and r.decode_tokens_per_second > 0 for r in results)
    # without the full cache among the presses, the share is still of the full cache's size
    alone = compare_presses(model, task, {"h2o": H2OPress(0.25, interval=16)}, interval=16, examples=3,
                            batch_size=2)
    assert alone[0].kept == 0.25 and alone[0].score == by_name["h2o"].score


def test_cache_entries_counts_every_cache_in_a_state():
    model = small_lm("mac")
    _, state = model(torch.randint(0, 64, (2, 20)))
    assert cache_entries(state) > 0
    assert cache_entries((None, 3, "x")) == 0


def test_a_scorer_evolved_for_a_budget_ranks_entries_at_a_budget(tmp_path):
    result = fit_namm(small_lm(), make_task("needle", seq_len=32, vocab_size=64), generations=1, population=2,
                      batch_size=2, scorer=BAMScorer(4), interval=8, budget=0.5, out=tmp_path / "namm.safetensors",
                      verbose=False)
    assert result.scorer.budget == 0.5
    assert BAMScorer.load(tmp_path / "namm.safetensors").budget == 0.5
    assert NAMMPress(tmp_path / "namm.safetensors").budget == 0.5  # its own budget by default
    assert make_press(f"namm:{tmp_path / 'namm.safetensors'}", budget=0.1).budget == 0.1  # or the one asked for
    BAMScorer(4).save(tmp_path / "own.safetensors")
    assert make_press(f"namm:{tmp_path / 'own.safetensors'}", budget=0.1).budget is None  # it decides itself


def test_compare_presses_measures_mac_whose_cache_empties_at_each_segment():
    results = compare_presses(small_lm("mac"), make_task("needle", seq_len=64, vocab_size=64),
                              {"full": None, "h2o": H2OPress(0.25, interval=16)}, interval=16, examples=2)
    assert results[0].kept == 1.0 and results[0].cache_entries > 0
    assert 0.2 <= results[1].kept <= 0.3
