"""The tasks NAMM evolves on: retrieval answers and language-model loss, end to end on a tiny Hugging Face Llama."""

import pytest
import torch
from torch import nn

from memorycore import InputError
from memorycore.namm import AnswerTask, BAMScorer, LossTask, NAMMPress, fit_namm, passkey_task

transformers = pytest.importorskip("transformers")


def tiny_llama(vocab: int = 64) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


class Echo(nn.Module):
    """Predicts the token it is given: logits peaked at the input."""

    def forward(self, inputs):
        return nn.functional.one_hot(inputs, 16).float()


def test_answer_task_scores_the_share_of_answer_tokens_predicted():
    inputs = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    labels = torch.tensor([[-100, 6, 9, -100], [-100, -100, 7, 8]])  # Echo predicts inputs[t] for labels[t]
    task = AnswerTask(lambda n, random_state: (inputs, labels))
    assert task.score(Echo(), task.sample(2, torch.Generator())).tolist() == [0.5, 1.0]


def test_passkey_task_samples_reproducibly_and_scores_a_hugging_face_model():
    task = passkey_task(64, vocab_size=64, value_len=2)
    first, second = task.sample(3, torch.Generator().manual_seed(1)), task.sample(3, torch.Generator().manual_seed(1))
    assert torch.equal(first[0], second[0]) and first[0].shape == (3, 64)
    scores = task.score(tiny_llama(), first)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())


def test_loss_task_with_a_keep_all_press_scores_as_the_full_cache_and_evolves_end_to_end():
    model = tiny_llama()
    task = LossTask(torch.randint(0, 64, (500,)), seq_len=48)
    batch = task.sample(2, torch.Generator().manual_seed(0))
    full = task.score(model, batch)
    with NAMMPress(interval=8)(model):
        torch.testing.assert_close(task.score(model, batch), full)
    result = fit_namm(model, task, generations=2, population=4, batch_size=2, scorer=BAMScorer(hidden=4),
                      interval=8, verbose=False)
    assert len(result.history) == 2 and all(0 < h["mean"] < 2 for h in result.history)
    with pytest.raises(InputError, match="needs more than seq_len"):
        LossTask(torch.arange(10), seq_len=48)


def test_our_language_model_is_pressed_along_the_prompt():
    lm_model = pytest.importorskip("memorycore.lm.model")
    from memorycore.titans import TitansConfig

    model = lm_model.TitansLM(64, TitansConfig(dim=16, depth=2, variant="attention", heads=2)).eval()
    task = passkey_task(64, vocab_size=64, value_len=2)
    batch = task.sample(2, torch.Generator().manual_seed(0))
    full = task.score(model, batch)
    with NAMMPress(interval=16)(model):
        torch.testing.assert_close(task.score(model, batch), full)
    press = NAMMPress(BAMScorer(hidden=4).load_vector(torch.randn(BAMScorer(hidden=4).num_parameters)), interval=16)
    with press(model):
        task.score(model, batch)
    assert all(stats.applications == 4 for stats in press.stats.values())  # at 16, 32, 48 and 64 tokens
    assert getattr(model, "_memorycore_press", None) is None
