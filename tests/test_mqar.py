"""MQAR generator (Zoology protocol), a tiny RAMNet model that learns it, and bench/mqar.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memorycore import InputError, RAMNet
from memorycore.mqar import IGNORE_INDEX, ZOOLOGY_TEST_SETTINGS, mqar_accuracy, mqar_batch


@pytest.mark.parametrize("seq_len,pairs", [(64, 4), (64, 16), (256, 64)], ids=lambda v: str(v))
def test_generator_follows_the_protocol(seq_len, pairs):
    vocab = 8192
    inputs, labels = mqar_batch(20, seq_len, pairs, vocab_size=vocab, random_state=3)
    assert inputs.shape == labels.shape == (20, seq_len)
    keys, values = inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2]
    assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
    for row in range(20):
        assert len(set(keys[row].tolist())) == pairs and len(set(values[row].tolist())) == pairs
        answer = dict(zip(keys[row].tolist(), values[row].tolist()))
        queries = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert len(queries) == pairs  # every key is queried once
        assert ((queries >= 2 * pairs) & ((queries - 2 * pairs) % 2 == 0)).all()  # even offsets after the pairs
        asked = inputs[row, queries].tolist()
        assert sorted(asked) == sorted(answer)
        assert labels[row, queries].tolist() == [answer[k] for k in asked]
    assert (labels[:, :2 * pairs] == IGNORE_INDEX).all()


def test_generator_is_seeded_and_filler_can_be_zero():
    a = mqar_batch(4, 64, 8, random_state=7)
    b = mqar_batch(4, 64, 8, random_state=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], mqar_batch(4, 64, 8, random_state=8)[0])
    inputs, labels = mqar_batch(4, 64, 8, random_filler=False, random_state=7)
    filler = labels == IGNORE_INDEX
    filler[:, :16] = False
    assert (inputs[filler] == 0).all()


def test_gaps_favour_short_distances():
    """p(i) ~ a i^(a-1) with a = 0.01 puts more queries near the pairs than far away."""
    _, labels = mqar_batch(400, 512, 8, random_state=0)
    offsets = (labels != IGNORE_INDEX).nonzero()[:, 1] - 16
    near, far = (offsets < 124).sum(), (offsets >= 372).sum()
    assert near > 1.5 * far


@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_len=63), "even"),
    (dict(num_pairs=20), "too short"),
    (dict(vocab_size=64), "larger than seq_len"),
    (dict(power_a=0.0), "power_a"),
], ids=lambda v: str(v))
def test_generator_rejects_bad_settings(kwargs, message):
    settings = dict(num_examples=2, seq_len=64, num_pairs=4)
    settings.update(kwargs)
    with pytest.raises(InputError, match=message):
        mqar_batch(**settings)


def test_zoology_test_settings():
    assert len(ZOOLOGY_TEST_SETTINGS) == 7 and ZOOLOGY_TEST_SETTINGS[-1] == (1024, 256)


def test_accuracy_counts_only_query_positions():
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1], labels[0, 3] = 2, 0
    logits = torch.zeros(1, 4, 3)
    logits[0, :, 2] = 1.0
    assert mqar_accuracy(logits, labels) == 0.5
    with pytest.raises(InputError):
        mqar_accuracy(logits, torch.full((1, 4), IGNORE_INDEX))


class TinyRecaller(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.memory = RAMNet(dim, heads=1, factors=2, factor_size=8, top_k=4, cape=False, chunk_size=8)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.memory(self.norm(x))[0]
        return self.head(x + self.mlp(x))


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_mqar_run_learns_well_above_chance(one_thread):
    vocab, seq_len, pairs = 64, 32, 4
    model = TinyRecaller(vocab, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        inputs, labels = mqar_batch(32, seq_len, pairs, vocab_size=vocab, random_state=generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs, labels = mqar_batch(200, seq_len, pairs, vocab_size=vocab, random_state=1)
    with torch.no_grad():
        accuracy = mqar_accuracy(model(inputs), labels)
    chance = 1 / (vocab // 2)
    print(f"tiny MQAR accuracy {accuracy:.3f} (chance {chance:.3f})")
    assert accuracy > 0.4 > 10 * chance, accuracy


def bench_mqar():
    """bench/mqar.py as a module (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import mqar

    return mqar


def test_bench_attention_scores_depend_on_relative_position_only():
    """The reference attention of bench/mqar.py has rotary positions: q_i . k_j is a function of i - j."""
    rotary = bench_mqar().rotary
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    queries, keys = rotary(q.expand(1, 1, 12, 8)), rotary(k.expand(1, 1, 12, 8))
    scores = (queries @ keys.transpose(-1, -2))[0, 0]
    torch.testing.assert_close(scores[5, 2], scores[9, 6])  # both 3 apart
    torch.testing.assert_close(scores[7, 7], scores[0, 0])
    assert not torch.isclose(scores[5, 2], scores[5, 4])  # and position does matter
    torch.testing.assert_close(queries.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 12))  # a rotation


def test_bench_runs_end_to_end_and_reports_read_shares(tmp_path, capsys, one_thread):
    """bench/mqar.py --quick for a few steps: a JSON row per model, RAM-Net's with its share of reads finding writes."""
    out, plot = tmp_path / "mqar.json", tmp_path / "mqar.png"
    bench_mqar().main(["--quick", "--models", "ramnet,attention", "--steps", "3", "--test-examples", "4",
               "--eval-batch-size", "4", "--verbose", "--out", str(out), "--plot", str(plot)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["model"] for row in rows] == ["ramnet", "attention"]
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert (result["settings"]["steps"], result["settings"]["quick"], result["settings"]["out"]) == (3, True, str(out))
    labels = [label for label, _ in bench_mqar().result_curves(out, "mine")]  # a label per model of the file
    assert [label.split(":")[0] for label in labels] == ["mine, RAM-Net", "mine, attention"]
    shares = rows[0]["reads_finding_writes"]
    assert len(shares) == 2 and all(0 <= share <= 1 for share in shares)
    assert "reads finding a write" in capsys.readouterr().err  # the --verbose training line


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def mqar_result(path: Path, accuracy: dict[str, float], status: str = "done") -> Path:
    """A results file as bench/mqar.py writes it: one RAM-Net row, 8^4 slots, seed 3."""
    settings = {"slots_exponent": "12", "ramnet_factor_size": "8", "seed": "3"}
    row = {"model": "ramnet", "d_model": 128, "steps": 40, "status": status, "accuracy": accuracy,
           "mean_accuracy": sum(accuracy.values()) / len(accuracy)}
    path.write_text(json.dumps({"settings": settings, "device": "cpu", "rows": [row]}))
    return path


def test_bench_draws_earlier_results_side_by_side(tmp_path, monkeypatch):
    """--from draws saved runs (labels read from their settings, or --labels); the test settings are ordered."""
    mqar = bench_mqar()
    first = mqar_result(tmp_path / "a.json", {"1024/256": 0.5, "64/4": 1.0})
    second = mqar_result(tmp_path / "b.json", {"64/4": 0.75, "128/32": 0.25})
    drawn = {}
    monkeypatch.setattr(mqar, "plot_accuracy", lambda curves, path: drawn.update(curves=curves, path=path))
    mqar.main(["--from", str(first), str(second), "--plot", str(tmp_path / "x.png")])
    assert drawn["curves"] == [("RAM-Net, d_model 128, 8^4 slots, seed 3, 40 steps: mean 0.750",
                                {"1024/256": 0.5, "64/4": 1.0}),
                               ("RAM-Net, d_model 128, 8^4 slots, seed 3, 40 steps: mean 0.500",
                                {"64/4": 0.75, "128/32": 0.25})]
    mqar.main(["--from", str(first), str(second), "--labels", "long", "short", "--plot", str(tmp_path / "x.png")])
    assert [label for label, _ in drawn["curves"]] == ["long: mean 0.750", "short: mean 0.500"]
    monkeypatch.undo()
    mqar.main(["--from", str(first), str(second), "--plot", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("contents,message", [
    ("not json", "is not a results file of bench/mqar.py"),
    ('{"rows": []}', "is not a results file of bench/mqar.py"),
    ('{"settings": {}, "rows": [{"status": "done", "model": "ramnet"}]}', "is not a results file of bench/mqar.py"),
    (None, "holds no finished run to draw"),
    ("missing", "does not exist; give the JSON a run of bench/mqar.py wrote"),
], ids=["text", "no-settings", "row-without-scores", "paused", "missing"])
def test_bench_refuses_to_draw_what_is_not_a_finished_result(tmp_path, capsys, contents, message):
    path = tmp_path / "result.json"
    if contents is None:
        mqar_result(path, {"64/4": 0.0}, status="paused")
    elif contents != "missing":
        path.write_text(contents)
    with pytest.raises(SystemExit) as exit_info:
        bench_mqar().main(["--from", str(path), "--plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--from", "a.json"], "--from draws earlier results; say where with --plot"),
    (["--from", "a.json", "--labels", "x", "y", "--plot", "x.png"], "--labels needs one label per --from file"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--ramnet-balance", "-0.1"], "--ramnet-balance must be a finite number >= 0"),
    (["--ramnet-temperature", "0"], "--ramnet-temperature must be a finite number > 0"),
    (["--ramnet-factor-size", "6"], "--ramnet-factor-size must be a power of 2 >= 2"),
    (["--ramnet-factor-size", "0"], "--ramnet-factor-size must be a power of 2 >= 2"),
    (["--slots-exponent", "-6"], "argument --slots-exponent: must be > 0, got -6"),
    (["--slots-exponent", "0"], "argument --slots-exponent: must be > 0, got 0"),  # not the default, silently
    (["--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--slots-exponent", "7"], "--slots-exponent 7 must be a positive multiple of 3, log2(--ramnet-factor-size 8)"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bench_rejects_bad_settings(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_mqar().main(["--quick", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_ramnet_slots_split_into_the_factors_asked_for():
    """--slots-exponent 12 --ramnet-factor-size 16: 16^3 slots; the temperature reaches every layer."""
    mqar = bench_mqar()
    args = mqar.parse_args(["--slots-exponent", "12", "--ramnet-factor-size", "16", "--ramnet-temperature", "2"])
    model, state = mqar.build_model("ramnet", 64, 64, args)
    layers = [m for m in model.modules() if isinstance(m, RAMNet)]
    assert [(layer.factors, layer.factor_size, layer.slots) for layer in layers] == [(3, 16, 4096)] * 2
    assert all(torch.allclose(layer.log_temperature.exp(), torch.tensor(2.0)) for layer in layers)
    assert state["total"] == 2 * layers[0].heads * 4096 * 65


@pytest.mark.parametrize("flags,shape", [([], (4, 8)), (["--quick"], (2, 8))], ids=["full", "quick"])
def test_bench_ramnet_default_slots(flags, shape):
    """Full: 8^4 slots (the layout that scored best at d_model 128); --quick: the 8^2 it was measured with."""
    mqar = bench_mqar()
    model, _ = mqar.build_model("ramnet", 64, 64, mqar.parse_args(flags))
    assert {(layer.factors, layer.factor_size) for layer in model.modules() if isinstance(layer, RAMNet)} == {shape}


def test_bench_training_resumes_exactly_where_a_killed_call_stopped(tmp_path, monkeypatch):
    """Killed after 3 of 6 steps, the next call resumes from the last save: same weights as 6 steps in one go."""
    mqar = bench_mqar()
    args = mqar.parse_args(["--quick", "--steps", "6", "--checkpoint-dir", str(tmp_path),
                            "--checkpoint-every", "1e-9"])  # save before every step
    checkpoint = tmp_path / "ramnet.safetensors"
    fingerprint = mqar.run_fingerprint(args, "ramnet", 64)

    def fresh_model():
        torch.manual_seed(0)
        return mqar.build_model("ramnet", args.vocab_size, 64, args)[0]

    whole = fresh_model()
    assert mqar.train(whole, args, mqar.QUICK_TRAIN_MIXTURE, torch.device("cpu")).steps == 6

    calls = []
    real_step = mqar.training_step

    def killed_at_the_fourth_step(*step_args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process dies before its 4th step
        return real_step(*step_args)

    monkeypatch.setattr(mqar, "training_step", killed_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        mqar.train(fresh_model(), args, mqar.QUICK_TRAIN_MIXTURE, torch.device("cpu"), checkpoint=checkpoint,
                   fingerprint=fingerprint)
    assert checkpoint.is_file()
    resumed_calls = []

    def counted_step(*step_args):
        resumed_calls.append(1)
        return real_step(*step_args)

    monkeypatch.setattr(mqar, "training_step", counted_step)
    resumed = fresh_model()
    progress = mqar.train(resumed, args, mqar.QUICK_TRAIN_MIXTURE, torch.device("cpu"), checkpoint=checkpoint,
                          fingerprint=fingerprint)
    assert (progress.steps, progress.finished) == (6, True)
    assert len(resumed_calls) == 3  # steps 4-6: the first 3 came from the checkpoint, not from training again
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(whole.state_dict()["embed.weight"], fresh_model().state_dict()["embed.weight"])


def test_bench_call_seconds_pauses_then_the_same_command_finishes(tmp_path, capsys):
    """--call-seconds ends training saved and unscored; run again, it resumes, finishes and scores."""
    mqar = bench_mqar()
    out = tmp_path / "mqar.json"
    command = ["--quick", "--models", "ramnet", "--steps", "4", "--test-examples", "4", "--eval-batch-size", "4",
               "--checkpoint-dir", str(tmp_path / "state"), "--out", str(out)]
    mqar.main(command + ["--call-seconds", "1e-6"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "paused" and row["steps"] < 4 and "mean_accuracy" not in row
    assert "run the same command again" in capsys.readouterr().out
    mqar.main(command)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "done" and row["steps"] == 4
    assert row["mean_accuracy"] == pytest.approx(sum(row["accuracy"].values()) / len(row["accuracy"]))
    assert "resumed from" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:  # another lr is another run: refused, the state kept
        mqar.main(command + ["--lr", "1e-2"])
    assert exit_info.value.code == 2
    assert "lr 0.003 there, 0.01 here" in capsys.readouterr().err
    assert (tmp_path / "state" / "mqar_ramnet_d64.safetensors").exists()


def test_bench_call_seconds_needs_a_checkpoint_dir(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_mqar().main(["--quick", "--call-seconds", "60"])
    assert exit_info.value.code == 2
    assert "--call-seconds needs --checkpoint-dir" in capsys.readouterr().err


def test_bench_checkpoint_dir_must_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        bench_mqar().main(["--quick", "--checkpoint-dir", str(a_file)])
    assert exit_info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
