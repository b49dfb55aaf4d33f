"""`python cli.py lm namm fit | evaluate` and `lm generate --press` through typer's CliRunner, bad input included."""

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from memorycore.checkpoint import save_checkpoint
from memorycore.lm import MemoryLM
from memorycore.namm import BAMScorer, H2OPress

runner = CliRunner()
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
TINY = {"dim": 16, "depth": 1, "heads": 2, "block_size": 16, "batch_size": 2, "max_steps": 2, "eval_interval": 1,
        "device": "cpu", "verbose": False}
SHORT = ["--seq-len", "32", "--interval", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("namm_cli")
    (folder / "input.txt").write_text(TEXT)
    (folder / "notes.txt").write_text("not a model")
    MemoryLM(variant="attention", **TINY).fit(TEXT).save(folder / "lm.safetensors")
    MemoryLM(variant="lmm", memory_chunk=8, **TINY).fit(TEXT).save(folder / "lmm.safetensors")
    BAMScorer(4).save(folder / "scorer.safetensors")
    save_checkpoint(folder / "other.safetensors", {"w": torch.zeros(2)}, {"class": "DNAClassifier"})
    return folder


def invoke(workspace, *args):
    """``lm *args`` with the file names (``namm:<file>`` included) in ``workspace``."""
    def located(arg: str) -> str:
        return ",".join(f"namm:{workspace / spec[5:]}" if spec.startswith("namm:") else
                        str(workspace / spec) if spec.endswith((".txt", ".safetensors")) else spec
                        for spec in arg.split(","))
    return runner.invoke(app, ["lm", *map(located, args)])


@pytest.mark.parametrize("command", [["namm"], ["namm", "fit"], ["namm", "evaluate"], ["generate"]])
def test_help_with_examples(command):
    result = runner.invoke(app, ["lm", *command, "--help"])
    assert result.exit_code == 0
    assert command == ["namm"] or "Examples" in result.stdout
    assert command != ["generate"] or "--press" in result.stdout


def test_evaluate_prints_a_table_of_every_press(workspace):
    result = invoke(workspace, "namm", "evaluate", "--model", "lm.safetensors", "--press",
                    "namm:scorer.safetensors,h2o,l2,full", "--budget", "0.25", "--task", "lm-loss", "--data",
                    "input.txt", "--examples", "3", "--batch-size", "2", "--decode-tokens", "2", *SHORT)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:-1]}
    assert list(rows) == [f"namm:{workspace / 'scorer.safetensors'}", "h2o", "l2", "full"]
    # 32 tokens pressed every 8 at budget 0.25: 8 entries per head at the end; the untrained scorer keeps all
    assert rows["h2o"][2] == rows["l2"][2] == "25.0%"
    assert rows["full"][2] == rows[f"namm:{workspace / 'scorer.safetensors'}"][2] == "100.0%"
    assert all(0 < float(row[1]) <= 1 for row in rows.values())


def test_evaluate_retrieval_tasks_by_name(workspace):
    for task in ("passkey", "needle", "mk-niah"):
        result = invoke(workspace, "namm", "evaluate", "--model", "lm.safetensors", "--task", task, "--examples",
                        "2", "--press", "full,l2", *SHORT[:-2], "--seq-len", "64")
        assert result.exit_code == 0, result.output
        assert "l2" in result.stdout


def test_fit_writes_a_scorer_that_evaluate_reads(workspace):
    out = workspace / "namm.safetensors"
    result = invoke(workspace, "namm", "fit", "--model", "lm.safetensors", "--task", "lm-loss", "--data",
                    "input.txt", "--out", "namm.safetensors", "--generations", "2", "--population", "3",
                    "--batch-size", "2", "--hidden", "4", "--quiet", *SHORT)
    assert result.exit_code == 0, result.output
    assert "best fitness" in result.stdout and "2 generations of 3" in result.stdout
    assert BAMScorer.load(out).hidden == 4
    assert not (workspace / "namm.evolution.safetensors").exists()  # the checkpoint goes at the end
    evaluated = invoke(workspace, "namm", "evaluate", "--model", "lm.safetensors", "--press", "namm:namm.safetensors",
                       "--task", "lm-loss", "--data", "input.txt", "--examples", "2", *SHORT)
    assert evaluated.exit_code == 0, evaluated.output


def test_a_scorer_evolved_for_a_budget_keeps_the_budget_asked(workspace):
    result = invoke(workspace, "namm", "fit", "--model", "lm.safetensors", "--task", "lm-loss", "--data",
                    "input.txt", "--out", "budgeted.safetensors", "--budget", "0.5", "--generations", "1",
                    "--population", "2", "--batch-size", "2", "--hidden", "4", "--quiet", *SHORT)
    assert result.exit_code == 0, result.output
    evaluated = invoke(workspace, "namm", "evaluate", "--model", "lm.safetensors", "--press",
                       "namm:budgeted.safetensors", "--budget", "0.25", "--task", "lm-loss", "--data", "input.txt",
                       "--examples", "2", *SHORT)
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stdout.splitlines()[2].split()[2] == "25.0%"


def test_fit_resumes_a_checkpoint(workspace):
    from memorycore.namm import fit_namm
    from memorycore.namm.evaluation import make_task

    model = MemoryLM.load(workspace / "lm.safetensors")
    task = make_task("lm-loss", seq_len=32, vocab_size=256, tokens=model.tokenizer_.encode(TEXT))
    checkpoint = workspace / "resumed.evolution.safetensors"
    fit_namm(model.network_, task, generations=1, population=3, batch_size=2, scorer=BAMScorer(4), interval=8,
             checkpoint=checkpoint, verbose=False)
    result = invoke(workspace, "namm", "fit", "--model", "lm.safetensors", "--task", "lm-loss", "--data",
                    "input.txt", "--out", "resumed.safetensors", "--generations", "2", "--population", "3",
                    "--batch-size", "2", "--hidden", "4", "--resume", *SHORT)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("generation 2/2") == 1 and "generation 1/2" not in result.stderr


def test_generate_under_a_press(workspace):
    result = invoke(workspace, "generate", "--model", "lm.safetensors", "--prompt", TEXT[:100], "--tokens", "5",
                    "--press", "h2o", "--budget", "0.25", "--interval", "16", "--seed", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(TEXT[:100])
    assert "evictions per layer" in result.stderr


def test_a_pressed_prefill_keeps_the_budget(workspace):
    model = MemoryLM.load(workspace / "lm.safetensors")
    press = H2OPress(0.25, interval=16)
    with press(model):  # the estimator's network is pressed
        model.generate(TEXT[:160], 1, temperature=0)
    for stats in press.stats.values():
        # the prompt is read in pieces of 16: never more than a budget's worth plus one interval in the cache
        assert stats.applications == 160 // 16
        assert int(stats.before.max()) <= 40 + 16 and int(stats.after.max()) == 40


@pytest.mark.parametrize("args, message", [
    (["namm", "evaluate", "--budget", "0"], "budget"),
    (["namm", "evaluate", "--budget", "1.5"], "budget"),
    (["namm", "fit", "--budget", "-0.1"], "budget"),
    (["generate", "--press", "h2o", "--budget", "2"], "budget"),
    (["namm", "evaluate", "--press", "full,snapkv"], "unknown press"),
    (["generate", "--press", "random"], "unknown press"),
    (["namm", "evaluate", "--task", "sorting"], "unknown task"),
    (["namm", "fit", "--task", "sorting"], "unknown task"),
    (["namm", "evaluate", "--press", "namm:other.safetensors"], "NAMMScorer"),
    (["namm", "evaluate", "--press", "namm:notes.txt"], "safetensors"),
    (["namm", "evaluate", "--press", "namm"], "scorer file"),
    (["namm", "evaluate", "--model", "lmm.safetensors"], "no attention cache"),
    (["namm", "fit", "--model", "lmm.safetensors"], "no attention cache"),
    (["generate", "--model", "lmm.safetensors", "--press", "l2"], "no attention cache"),
    (["namm", "fit", "--task", "passkey"], "scores 0"),
    (["namm", "evaluate", "--task", "lm-loss"], "--data"),
    (["namm", "evaluate", "--task", "mqar", "--seq-len", "512"], "vocabulary"),
    (["namm", "evaluate", "--task", "passkey", "--data", "input.txt"], "lm-loss only"),
])
def test_bad_input_is_one_line_and_exit_code_2(workspace, args, message):
    if "--model" not in args:
        args = [*args, "--model", "lm.safetensors"]
    if args[0] == "namm" and "--seq-len" not in args:
        args = [*args, "--seq-len", "32", "--interval", "8", "--examples" if args[1] == "evaluate" else "--batch-size",
                "2"]
    if args[1] == "fit":
        args = [*args, "--out", "bad.safetensors", "--generations", "1", "--population", "2", "--quiet"]
    result = invoke(workspace, *args, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
