"""`python cli.py lm fit | generate | evaluate` through typer's CliRunner, bad input included; --resume on every fit."""

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from memorycore.checkpoint import save_checkpoint

runner = CliRunner()
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 10
SMALL = ["--dim", "16", "--depth", "1", "--block-size", "16", "--batch-size", "4", "--steps", "4",
         "--eval-interval", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    (folder / "input.txt").write_text(TEXT)
    (folder / "empty.txt").write_text("")
    (folder / "short.txt").write_text("All:\nSpeak.\n")
    (folder / "binary.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    save_checkpoint(folder / "other.safetensors", {"w": torch.zeros(2)}, {"class": "DNAClassifier"})
    result = runner.invoke(app, ["lm", "fit", "--data", str(folder / "input.txt"), "--out",
                                 str(folder / "lm.safetensors"), *SMALL])
    assert result.exit_code == 0, result.output
    assert "saved" in result.stdout and "validation loss" in result.stdout
    assert not (folder / "lm.training.safetensors").exists()  # the training checkpoint goes once the model is saved
    return folder


@pytest.mark.parametrize("command", [["lm"], ["lm", "fit"], ["lm", "generate"], ["lm", "evaluate"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert command == ["lm"] or "Examples" in result.stdout


def test_generate_streams_the_prompt_and_its_continuation(workspace):
    result = runner.invoke(app, ["lm", "generate", "--model", str(workspace / "lm.safetensors"), "--prompt", "All:",
                                 "--tokens", "30", "--seed", "1", "--top-k", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("All:") and len(result.stdout) > 10
    again = runner.invoke(app, ["lm", "generate", "--model", str(workspace / "lm.safetensors"), "--prompt", "All:",
                                "--tokens", "30", "--seed", "1", "--top-k", "5", "--device", "cpu"])
    assert again.stdout == result.stdout


def test_evaluate_prints_loss_bits_per_byte_and_perplexity(workspace):
    result = runner.invoke(app, ["lm", "evaluate", "--model", str(workspace / "lm.safetensors"), "--data",
                                 str(workspace / "input.txt"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "nats/token" in result.stdout and "bits/byte" in result.stdout and "perplexity" in result.stdout


def test_fit_with_bpe_and_resume_without_a_checkpoint(workspace):
    out = workspace / "bpe.safetensors"
    result = runner.invoke(app, ["lm", "fit", "--data", str(workspace / "input.txt"), "--data",
                                 str(workspace / "input.txt"), "--tokenizer", "bpe", "--vocab-size", "300",
                                 "--variant", "attention", "--out", str(out), "--resume", *SMALL])
    assert result.exit_code == 0, result.output
    assert "starts afresh" in result.stderr and "bpe tokens (300)" in result.stdout


@pytest.mark.parametrize("command, message", [
    (["fit", "--data", "missing.txt"], "does not exist"),
    (["fit", "--data", "empty.txt"], "empty"),
    (["fit", "--data", "binary.bin"], "binary"),
    (["fit", "--data", "short.txt"], "too short"),
    (["fit", "--data", "input.txt", "--variant", "rnn"], "variant"),
    (["generate", "--model", "lm.safetensors", "--prompt", "Zebra"], "never had"),
    (["generate", "--model", "lm.safetensors", "--prompt", ""], "empty"),
    (["generate", "--model", "other.safetensors"], "not a MemoryLM"),
    (["generate", "--model", "input.txt"], "not a readable safetensors"),
    (["evaluate", "--model", "lm.safetensors", "--data", "binary.bin"], "binary"),
    (["evaluate", "--model", "missing.safetensors", "--data", "input.txt"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(workspace, command, message):
    args = [str(workspace / a) if a.endswith((".txt", ".bin", ".safetensors")) else a for a in command]
    extra = SMALL + ["--out", str(workspace / "bad.safetensors")] if command[0] == "fit" else ["--device", "cpu"]
    result = runner.invoke(app, ["lm", *args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["forecast", "fit"], ["genomics", "fit"], ["lm", "fit"]])
def test_every_fit_takes_resume(command):
    assert "--resume" in runner.invoke(app, [*command, "--help"]).stdout
