"""`python cli.py genomics fit | classify | evaluate` through typer's CliRunner, including bad input."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from genomics import DNAClassifier

runner = CliRunner()
FAST = ["--epochs", "1", "--dim", "16", "--blocks", "1", "--batch-size", "16", "--device", "cpu", "--quiet"]


def motif_records(n, seed=0, length=40):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        bases = list(rng.choice(list("ACGT"), length))
        if i % 2:
            start = rng.integers(0, length - 8)
            bases[start:start + 8] = "TATAAAAG"
        records.append((f"s{i}", "".join(bases), i % 2))
    return records


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A FASTA, its label file, a CSV and a fitted model (made through the API to keep the CLI tests quick)."""
    folder = tmp_path_factory.mktemp("cli")
    records = motif_records(160)
    (folder / "seqs.fa").write_text("".join(f">{i} some description\n{s[:25]}\n{s[25:]}\n" for i, s, _ in records))
    (folder / "labels.tsv").write_text("".join(f"{i}\t{y}\n" for i, _, y in records))
    (folder / "table.csv").write_text("seq,label\n" + "".join(f"{s},{y}\n" for _, s, y in records))
    classifier = DNAClassifier(dim=16, blocks=1, heads=2, chunk_size=8, stem_kernel=8, epochs=8, batch_size=32,
                               lr=2e-2, validation_fraction=0.0, verbose=False, device="cpu")
    classifier.fit([s for _, s, _ in records], [y for _, _, y in records])
    classifier.save(folder / "model.safetensors")
    return folder


def invoke(*args):
    return runner.invoke(app, ["genomics", *map(str, args)])


def assert_clean_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == "", f"rejected input still wrote to stdout: {result.stdout!r}"


def test_fit_from_fasta_with_labels_then_classify_with_the_saved_model(workspace, tmp_path):
    model = tmp_path / "m.safetensors"
    result = invoke("fit", "--train", workspace / "seqs.fa", "--labels", workspace / "labels.tsv", "--out", model,
                    *FAST)
    assert result.exit_code == 0, result.output
    assert model.is_file() and "160 sequences" in result.stdout
    classifier = DNAClassifier.load(model)
    assert list(classifier.classes_) == [0, 1]
    result = invoke("classify", workspace / "seqs.fa", "--model", model, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    predicted = [int(line.split("\t")[1]) for line in result.stdout.splitlines()[1:]]
    assert predicted == classifier.predict([s for _, s, _ in motif_records(160)]).tolist()


def test_fit_from_csv_and_genomic_benchmarks_folder(workspace, tmp_path):
    result = invoke("fit", "--train", workspace / "table.csv", "--out", tmp_path / "csv.safetensors", *FAST)
    assert result.exit_code == 0, result.output
    assert "160 sequences" in result.stdout
    for name, label in (("neg", 0), ("pos", 1)):
        folder = tmp_path / "task" / "train" / name
        folder.mkdir(parents=True)
        for record_id, sequence, y in motif_records(40):
            if y == label:
                (folder / f"{record_id}.txt").write_text(sequence)
    result = invoke("fit", "--train", tmp_path / "task", "--out", tmp_path / "gb.safetensors", *FAST)
    assert result.exit_code == 0, result.output
    assert "classes neg, pos;" in result.stdout


def test_classify_writes_tsv_with_a_probability_per_class(workspace, tmp_path):
    out = tmp_path / "preds.tsv"
    result = invoke("classify", workspace / "seqs.fa", "--model", workspace / "model.safetensors", "--out", out,
                    "--batch-size", "7", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "id\tpredicted\tprob_0\tprob_1"
    assert len(lines) == 161 and lines[1].split("\t")[0] == "s0"
    rows = [line.split("\t") for line in lines[1:]]
    proba = np.array([[float(p) for p in row[2:]] for row in rows])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert all(row[1] == str(int(p[1] > p[0])) for row, p in zip(rows, proba))
    accuracy = np.mean([int(row[1]) == y for row, (_, _, y) in zip(rows, motif_records(160))])
    assert accuracy >= 0.8
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_classify_to_stdout_and_long_sequence_warning(workspace, tmp_path):
    (tmp_path / "long.fa").write_text(">long\n" + "ACGTTATAAAAGCC" * 10 + "\n>short\nACGT\n")
    result = invoke("classify", tmp_path / "long.fa", "--model", workspace / "model.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("long\t") and len(result.stdout.splitlines()) == 3
    assert "1 sequence(s) longer than the model's max_length 40" in result.stderr
    (tmp_path / "long.tsv").write_text("long\t1\nshort\t0\n")
    result = invoke("evaluate", "--model", workspace / "model.safetensors", "--data", tmp_path / "long.fa",
                    "--labels", tmp_path / "long.tsv")
    assert result.exit_code == 0, result.output
    warning, = result.stderr.strip().splitlines()  # the warning alone, without the file and line that raised it
    assert warning.startswith("warning: ") and "longer than" in warning, result.stderr


def test_classify_escapes_tabs_and_line_breaks_in_ids(workspace, tmp_path):
    (tmp_path / "odd.csv").write_text('id,seq\n"a\tb",ACGTACGTAC\n"c\nd",TTGATTGACC\n')
    result = invoke("classify", tmp_path / "odd.csv", "--model", workspace / "model.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["id", "a\\tb", "c\\nd"] and {len(row) for row in rows} == {4}


def test_classify_bed_regions_of_a_real_fasta(workspace, shared_datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORYCORE_CACHE_DIR", str(tmp_path / "cache"))
    folder = shared_datasets / "reference_fasta"
    fasta = tmp_path / "chr22.fa"
    shutil.copy(folder / "hisat2_22_20-21M.fa", fasta)
    result = invoke("classify", fasta, "--bed", folder / "gb_test_positives_in_hisat2_chr22.bed",
                    "--model", workspace / "model.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    assert [row[3] for row in rows] == ["FP018600", "FP018598", "test_positive_420", "test_positive_599",
                                        "nontata_test_hfrow4428_id_unknown"]
    bed = [line.split("\t") for line in (folder / "gb_test_positives_in_hisat2_chr22.bed").read_text().splitlines()]
    assert [row[:3] + [row[5]] for row in rows] == [line[:3] + [line[5]] for line in bed[1:]]  # the coordinates


def test_evaluate_prints_metrics_and_confusion_matrix(workspace):
    result = invoke("evaluate", "--model", workspace / "model.safetensors", "--data", workspace / "seqs.fa",
                    "--labels", workspace / "labels.tsv", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for key in ("sequences  160", "accuracy", "f1_macro", "mcc", "confusion matrix"):
        assert key in text
    accuracy = float(text.split("accuracy")[1].split()[0])
    matrix = [line.split()[1:] for line in text.splitlines()[-2:]]
    assert sum(int(v) for row in matrix for v in row) == 160
    assert accuracy == pytest.approx((int(matrix[0][0]) + int(matrix[1][1])) / 160, abs=1e-4)


def test_evaluate_on_one_class_scores_that_class_alone_without_warnings(workspace, tmp_path):
    records = [line.split("\t") for line in (workspace / "labels.tsv").read_text().splitlines()]
    (tmp_path / "ones.tsv").write_text("".join(f"{i}\t{y}\n" for i, y in records if y == "1"))
    fasta = (workspace / "seqs.fa").read_text().split(">")[1:]
    ones = {i for i, y in records if y == "1"}
    (tmp_path / "ones.fa").write_text("".join(">" + r for r in fasta if r.split()[0] in ones))
    result = invoke("evaluate", "--model", workspace / "model.safetensors", "--data", tmp_path / "ones.fa",
                    "--labels", tmp_path / "ones.tsv", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    text = result.stdout
    accuracy, f1 = (float(text.split(key)[1].split()[0]) for key in ("accuracy", "f1_macro"))
    # every true class is 1: its precision is 1 and its recall the accuracy; class 0 counts (with F1 0) only if
    # it was predicted, so a perfect score is 1, not the mean of 1 and an absent class's 0
    class_1 = 2 * accuracy / (1 + accuracy)
    assert f1 == pytest.approx(class_1 if accuracy == 1.0 else class_1 / 2, abs=2e-4)
    assert "no sequence of class 0 in these data" in text


def test_commands_have_help_with_examples():
    for command in ("fit", "classify", "evaluate"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.output


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def bad(tmp_path, workspace):
    (tmp_path / "empty.fa").write_text("")
    (tmp_path / "blank.fa").write_text("\n\n")
    (tmp_path / "dup.fa").write_text(">a\nACGT\n>a\nACGT\n")
    (tmp_path / "letters.fa").write_text(">a\nACGT\n>b\nACJT\n")
    (tmp_path / "g.fa").write_text(">chrA\nACGTACGTAC\n")
    (tmp_path / "outside.bed").write_text("chrA\t5\t20\tr1\n")
    (tmp_path / "unknown.bed").write_text("chrQ\t0\t5\tr1\n")
    (tmp_path / "few_labels.tsv").write_text("s0\t0\ns1\t1\n")
    (tmp_path / "not_a_model.safetensors").write_text("hello")
    model = (workspace / "model.safetensors").read_bytes()
    (tmp_path / "corrupt.safetensors").write_bytes(model[:-100])
    return tmp_path


@pytest.mark.parametrize("args, fragment", [
    (["classify", "{bad}/missing.fa", "--model", "{model}"], "does not exist"),
    (["classify", "{bad}/empty.fa", "--model", "{model}"], "is empty"),
    (["classify", "{bad}/blank.fa", "--model", "{model}"], "no FASTA records"),
    (["classify", "{bad}/dup.fa", "--model", "{model}"], "duplicate record id 'a'"),
    (["classify", "{bad}/letters.fa", "--model", "{model}"], "record 'b': unknown letter 'J' at position 3"),
    (["classify", "{bad}/g.fa", "--bed", "{bad}/outside.bed", "--model", "{model}"], "ends past the end of 'chrA'"),
    (["classify", "{bad}/g.fa", "--bed", "{bad}/unknown.bed", "--model", "{model}"], "names sequence 'chrQ'"),
    (["classify", "{work}/seqs.fa", "--model", "{bad}/not_a_model.safetensors"], "not a readable safetensors"),
    (["classify", "{work}/seqs.fa", "--model", "{bad}/corrupt.safetensors"], "corrupt"),
    (["classify", "{work}/seqs.fa", "--model", "{bad}/missing.safetensors"], "does not exist"),
    (["classify", "{work}/seqs.fa", "--model", "{model}", "--out", "{work}/seqs.fa"], "is an input file"),
    (["classify", "{work}/seqs.fa", "--model", "{model}", "--out", "{bad}"], "it is a folder"),
    (["fit", "--train", "{work}/seqs.fa", "--labels", "{bad}/few_labels.tsv", "--out", "{bad}/g.fa/m.safetensors"],
     "is a file, not a folder"),
    (["evaluate", "--model", "{model}", "--data", "{work}/seqs.fa", "--labels", "{bad}/few_labels.tsv"],
     "no label for 158 of 160 records"),
    (["evaluate", "--model", "{model}", "--data", "{work}/seqs.fa"], "has no labels"),
    (["fit", "--train", "{work}/seqs.fa", "--out", "{bad}/m.safetensors"], "has no labels"),
    (["fit", "--train", "{bad}/letters.fa", "--labels", "{bad}/few_labels.tsv", "--out", "{bad}/m.safetensors"],
     "no label for"),
    (["fit", "--train", "{bad}/missing_dir", "--out", "{bad}/m.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(bad, workspace, args, fragment, monkeypatch):
    monkeypatch.setenv("MEMORYCORE_CACHE_DIR", str(bad / "cache"))
    names = dict(bad=bad, work=workspace, model=workspace / "model.safetensors")
    result = invoke(*[arg.format(**names) for arg in args])
    assert_clean_error(result, fragment)
