"""memorycore.lm: tokenizers, the network's decoding, and the MemoryLM estimator (fit, generate, evaluate, files)."""

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from memorycore import CheckpointError, InputError, TrainingError
from memorycore.lm import MemoryLM
from memorycore.lm.data import read_text
from memorycore.lm.estimator import LM_VARIANTS
from memorycore.lm.model import TitansLM, sample
from memorycore.lm.tokenizer import BPETokenizer, ByteTokenizer, TextStream, tokenizer_from_dict

ODD_BYTES = [b"", b"\xff\xfe\x00 invalid \xc3", "héllo wörld 😀\n\n  tabs\there".encode(), bytes(range(256)),
             "日本語のテキスト。".encode() + b"\xe6\x97"]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 8
TINY = dict(dim=16, depth=1, heads=2, window=8, segment_len=8, memory_chunk=4, persistent_tokens=2, block_size=16,
            batch_size=4, max_steps=4, eval_interval=2, eval_windows=4, verbose=False, device="cpu")


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT.encode() + "café 😀".encode(), 300)


@pytest.mark.parametrize("data", ODD_BYTES)
def test_tokenizers_round_trip_any_bytes(bpe, data):
    for tokenizer in (ByteTokenizer(), bpe, tokenizer_from_dict(bpe.to_dict())):
        ids = tokenizer.encode(data)
        assert tokenizer.decode(ids) == data
        assert ids.max(initial=0) < tokenizer.vocab_size
    assert len(bpe.encode(TEXT)) < len(TEXT) / 2  # the merges were learnt


def test_streamed_text_holds_back_split_characters():
    stream, pieces = TextStream(ByteTokenizer()), []
    for byte in "é😀x".encode() + b"\xff":
        pieces.append(stream.push(byte))
    pieces.append(stream.flush())
    assert pieces == ["", "é", "", "", "", "😀", "x", "\ufffd", ""]  # 0xff can start nothing: replaced at once


@pytest.mark.parametrize("variant", LM_VARIANTS)
def test_network_is_causal_and_decoding_from_the_state_equals_the_whole_prefix(variant):
    ramnet = variant == "ramnet"
    config = MemoryLM(variant=variant, **TINY).network_config()
    torch.manual_seed(0)
    network = TitansLM(40, config).double().eval()
    tokens = torch.randint(0, 40, (2, 20))
    logits, _ = network(tokens)
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 40
    assert torch.equal(network(changed)[0][:, :12], logits[:, :12])

    steps, state = [], None
    prompt = 5
    first, state = network(tokens[:, :prompt])
    for t in range(prompt, 20):
        step, state = network(tokens[:, t:t + 1], state)
        steps.append(step)
    tolerance = 1e-3 if ramnet else 1e-10  # RAM-Net keeps its slots in float32
    torch.testing.assert_close(torch.cat([first] + steps, 1), logits, rtol=0, atol=tolerance)


def test_generate_carries_the_state_and_greedy_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    network = TitansLM(30, MemoryLM(variant="mac", **TINY).network_config()).double().eval()
    prompt = torch.randint(0, 30, (1, 6))
    generated = list(network.generate(prompt, 12, temperature=0))
    tokens = prompt
    for expected in generated:
        with torch.no_grad():
            logits, _ = network(tokens)
        assert int(logits[0, -1].argmax()) == expected
        tokens = torch.cat([tokens, torch.tensor([[expected]])], 1)


def test_generation_that_diverges_says_so():
    network = TitansLM(30, MemoryLM(variant="attention", **TINY).network_config())
    with torch.no_grad():
        network.embedding.weight[7] = math.nan
    with pytest.raises(TrainingError, match="NaN or inf before generated token 1"):
        list(network.generate(torch.tensor([[7]]), 3))


def test_sampling_respects_top_k_top_p_and_the_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample(logits, top_k=2, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}
    draws = {int(sample(logits, top_p=0.7, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, top_p=0.1)) == 0 and int(sample(logits, temperature=0)) == 0


@pytest.fixture(scope="module")
def fitted():
    return MemoryLM(variant="mag", **TINY).fit(TEXT)


def test_a_tiny_model_overfits_a_short_text():
    text = "abcdefgh" * 40
    model = MemoryLM(variant="lmm", **{**TINY, "max_steps": 150, "eval_interval": 150, "lr": 1e-2,
                                       "dim": 32, "validation_fraction": 0.0}).fit(text)
    assert model.evaluate(text)["loss"] < 0.05
    assert model.generate("abc", 13, temperature=0) == "defghabcdefgh"


def test_evaluate_and_score_agree(fitted):
    scores = fitted.evaluate(TEXT)
    assert scores["tokens"] == len(TEXT) - 1
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] / math.log(2))  # one byte per token
    assert fitted.score(TEXT) == pytest.approx(-scores["loss"] * scores["tokens"])


def test_bits_per_byte_counts_the_bytes_of_bpe_tokens():
    model = MemoryLM(tokenizer="bpe", vocab_size=300, **TINY).fit(TEXT * 2)
    scores = model.evaluate(TEXT)
    assert scores["tokens"] < len(TEXT) / 2
    nll = scores["loss"] * scores["tokens"]
    predicted_bytes = len(TEXT) - len(model.tokenizer_.decode(model.tokenizer_.encode(TEXT)[:1]))
    assert scores["bits_per_byte"] == pytest.approx(nll / math.log(2) / predicted_bytes)


def test_generate_streams_text_and_a_seed_repeats_it(fitted):
    text = fitted.generate("All:", 30, seed=3)
    assert "".join(fitted.generate("All:", 30, seed=3, stream=True)) == text
    assert fitted.generate("All:", 0) == ""
    assert isinstance(fitted.generate("All:", 5, top_k=3, top_p=0.9, temperature=0.5), str)


@pytest.mark.parametrize("prompt, settings, message", [
    ("", {}, "prompt is empty"),
    ("Zebra ß", {}, "never had"),
    ("All", {"temperature": -1}, "temperature"),
    ("All", {"top_p": 0.0}, "top_p"),
    ("All", {"top_k": 0}, "top_k"),
])
def test_generate_refuses_bad_prompts_and_settings(fitted, prompt, settings, message):
    with pytest.raises(InputError, match=message):
        fitted.generate(prompt, 5, **settings)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_save_load_gives_identical_logits_and_pickle_and_clone_work(tmp_path, tokenizer):
    model = MemoryLM(variant="mac", tokenizer=tokenizer, vocab_size=280, **TINY).fit(TEXT)
    path = model.save(tmp_path / "lm.safetensors")
    tokens = torch.as_tensor(model.tokenizer_.encode(TEXT[:40]))[None]
    for other in (MemoryLM.load(path), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(other.network_(tokens)[0], model.network_(tokens)[0])
        assert other.generate("All", 20, seed=1) == model.generate("All", 20, seed=1)
    assert clone(model).get_params() == model.get_params()


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        MemoryLM.load(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        MemoryLM.load(tmp_path / "missing.safetensors")


def test_resumed_fit_equals_uninterrupted(tmp_path, monkeypatch):
    settings = {**TINY, "max_steps": 6, "dropout": 0.1}
    expected = MemoryLM(variant="mag", **settings).fit(TEXT)
    path = tmp_path / "run.safetensors"
    import memorycore.training as training

    calls, original = [0], training._train_epoch

    def killed_in_the_second_epoch(*args, **kwargs):  # mid-epoch kills: tests/test_training_checkpoint.py
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", killed_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        MemoryLM(variant="mag", **settings).fit(TEXT, checkpoint=path)
    monkeypatch.setattr(training, "_train_epoch", original)
    resumed = MemoryLM(variant="mag", **settings).fit(TEXT, checkpoint=path, resume=True)
    for a, b in zip(expected.network_.state_dict().values(), resumed.network_.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history_.val_loss == expected.history_.val_loss


def test_read_text_paths_and_refusals(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "b.txt").write_text("world")
    assert read_text([tmp_path / "a.txt", str(tmp_path / "b.txt")]) == b"hello world"
    assert read_text(str(tmp_path / "a.txt")) == b"hello "  # a str naming a file is its path
    assert read_text("just text") == b"just text"
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(np.arange(200) % 256))
    for path, message in [("empty.txt", "empty"), ("image.png", "binary"), ("missing.txt", "does not exist")]:
        with pytest.raises(InputError, match=message):
            read_text(tmp_path / path)
    with pytest.raises(InputError, match="too short"):
        MemoryLM(**TINY).fit("short text")
    with pytest.raises(InputError, match="variant"):
        MemoryLM(**{**TINY, "variant": "rnn"}).fit(TEXT)
